"""The language models the data engine talks to, behind one ``chat`` call.

- ``LocalModel``: a transformers model from a local folder or hub name, through the auto
  classes: a vision-language model (``AutoModelForImageTextToText`` with its ``AutoProcessor``:
  Qwen2.5-VL / Qwen3-VL, LLaVA, ...) when images come with the text, a causal language model
  (``AutoModelForCausalLM`` with its tokenizer) otherwise. Batched, left-padded ``generate``.
- ``Endpoint``: an OpenAI-compatible server (``/v1/chat/completions``), e.g. ``vllm serve`` or
  SGLang; images travel as base64 JPEG data URLs. Requests run concurrently.

Both are checked before any work starts: a folder that does not load, a server that does not
answer, each is one line naming which and how to fix it.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np

from sora_dist.errors import ConfigError

log = logging.getLogger("sora_dist")


@dataclass
class Request:
    """One conversation turn: an instruction, the user's text and optional images (uint8 H x W x 3)."""

    system: str
    text: str
    images: Optional[list[np.ndarray]] = None


def is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def connect(spec: str, vision: bool, device: str = "auto", max_new_tokens: int = 256, concurrency: int = 8,
            api_key_env: str = "OPENAI_API_KEY", endpoint_model: str = ""):
    """An ``Endpoint`` for a URL, else a ``LocalModel`` (vision or text-only)."""
    if is_url(spec):
        return Endpoint(spec, endpoint_model, os.environ.get(api_key_env, ""), max_new_tokens, concurrency)
    return LocalModel(spec, vision, device, max_new_tokens)


class LocalModel:
    def __init__(self, name: str, vision: bool, device: str = "auto", max_new_tokens: int = 256):
        import torch
        import transformers

        from sora_dist import device as device_lib

        dev = device_lib.detect(device)
        self.torch, self.device, self.name, self.vision, self.max_new_tokens = torch, dev.torch_device, name, vision, max_new_tokens
        dtype = torch.float32 if dev.kind == "cpu" else torch.bfloat16
        auto = transformers.AutoModelForImageTextToText if vision else transformers.AutoModelForCausalLM
        try:
            self.processor = (transformers.AutoProcessor if vision else transformers.AutoTokenizer).from_pretrained(name)
            self.model = auto.from_pretrained(name, dtype=dtype).to(self.device).eval()
        except (OSError, ValueError, KeyError) as err:
            kind = "a vision-language model (AutoModelForImageTextToText + AutoProcessor)" if vision else "a causal language model (AutoModelForCausalLM)"
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"{name!r} could not be loaded as {kind}: {first}. Pass a local model folder, a hub name, or an http(s) endpoint URL") from None
        self.tokenizer = self.processor.tokenizer if vision else self.processor
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def _prompt(self, request: Request) -> str:
        if self.vision:
            content = [*({"type": "image"} for _ in request.images or []), {"type": "text", "text": request.text}]
        else:
            content = request.text
        messages = [{"role": "system", "content": request.system if not self.vision else [{"type": "text", "text": request.system}]},
                    {"role": "user", "content": content}]
        if getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return f"{request.system}\n\n{request.text}\n\n"  # a base model without a chat template

    def chat(self, requests: list[Request], seed: Optional[int] = None, temperature: float = 0.0) -> list[str]:
        texts = [self._prompt(r) for r in requests]
        if self.vision:  # pixel values in the model's dtype (bf16 on an accelerator), ids as they are
            inputs = self.processor(text=texts, images=[r.images for r in requests], return_tensors="pt", padding=True)
            inputs = inputs.to(self.device, dtype=self.model.dtype)
        else:
            inputs = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        if seed is not None:
            self.torch.manual_seed(seed)
        with self.torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id, **sampling)
        return self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def jpeg_data_url(image: np.ndarray, quality: int = 90) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


class Endpoint:
    """An OpenAI-compatible chat-completions server."""

    def __init__(self, url: str, model: str = "", api_key: str = "", max_new_tokens: int = 256, concurrency: int = 8, timeout: float = 600.0):
        self.base = url.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.api_key, self.max_new_tokens, self.concurrency, self.timeout = api_key, max_new_tokens, concurrency, timeout
        try:
            listed = self._call("GET", "/models", None, timeout=15)
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise ConfigError(f"the endpoint {url} does not answer ({reason}): start the server (e.g. vllm serve MODEL --port 8000) "
                              "and pass its address, e.g. http://localhost:8000/v1") from None
        served = [m.get("id", "") for m in listed.get("data", [])]
        if model and served and model not in served:
            raise ConfigError(f"the endpoint {url} serves {', '.join(served)}, not {model!r}: pass one of those as the model")
        if not model and not served:
            raise ConfigError(f"the endpoint {url} lists no model at /v1/models: pass the model name")
        self.model = model or served[0]
        self.name = f"{self.model} at {self.base}"

    def _call(self, method: str, path: str, body: Optional[dict], timeout: float) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        with urllib.request.urlopen(urllib.request.Request(self.base + path, data=data, headers=headers, method=method), timeout=timeout) as response:
            return json.loads(response.read())

    def _one(self, request: Request, seed: Optional[int], temperature: float) -> str:
        content: list[dict] = [{"type": "image_url", "image_url": {"url": jpeg_data_url(image)}} for image in request.images or []]
        content.append({"type": "text", "text": request.text})
        body = {"model": self.model, "max_tokens": self.max_new_tokens, "temperature": temperature,
                "messages": [{"role": "system", "content": request.system}, {"role": "user", "content": content}]}
        if seed is not None:
            body["seed"] = seed
        for attempt in range(3):
            try:
                return self._call("POST", "/chat/completions", body, self.timeout)["choices"][0]["message"]["content"] or ""
            except (urllib.error.URLError, OSError, KeyError, ValueError) as err:
                if attempt == 2:
                    raise RuntimeError(f"{self.base}/chat/completions failed 3 times: {err}") from err
                log.warning("%s/chat/completions failed (%s); retrying", self.base, err)
        raise AssertionError("unreachable")

    def chat(self, requests: list[Request], seed: Optional[int] = None, temperature: float = 0.0) -> list[str]:
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(requests)))) as pool:
            return list(pool.map(lambda r: self._one(r, seed, temperature), requests))
