"""Tiny random language models saved as real ones are (a LLaVA vision-language model and a Llama
causal LM, each with a word-level tokenizer and a chat template), and a stand-in
OpenAI-compatible server. Their text is meaningless: the tests check the pipelines around them."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

WORDS = ("the video shows a red square moving right on dark background camera static pan fast slow person walks "
         "street city night day blue green light sign reads open").split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {% if m['content'] is string %}{{ m['content'] }}{% else %}"
            "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}"
            "{% endif %} </s> {% endfor %}{% if add_generation_prompt %}assistant : {% endif %}")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=SPECIAL))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   chat_template=TEMPLATE)


def save_tiny_vlm(folder: Path) -> Path:
    """LLaVA: a 2-layer CLIP vision tower on 28-pixel images, a 1-layer Llama, loaded through
    AutoProcessor + AutoModelForImageTextToText."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = _tokenizer()
    vocab = tokenizer.get_vocab()
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
                               tokenizer=tokenizer, chat_template=TEMPLATE, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    processor.save_pretrained(folder)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14).to_dict(),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=1, max_position_embeddings=1024, pad_token_id=0, bos_token_id=vocab["<s>"],
                                eos_token_id=vocab["</s>"]).to_dict(),
        image_token_index=vocab["<image>"], vision_feature_layer=-1, projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    return folder


def save_tiny_lm(folder: Path) -> Path:
    """A 1-layer Llama causal LM with the same tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer()
    vocab = tokenizer.get_vocab()
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, max_position_embeddings=1024, pad_token_id=0, bos_token_id=vocab["<s>"],
                                 eos_token_id=vocab["</s>"])).save_pretrained(folder)
    return folder


class StandInServer:
    """An OpenAI-compatible server on a free local port: /v1/models lists ``model``; each
    /v1/chat/completions request is recorded and answered by ``reply(request body)``."""

    def __init__(self, reply, model: str = "stand-in-vlm"):
        self.requests: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, value: dict) -> None:
                data = json.dumps(value).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": model, "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append(body)
                self._send({"choices": [{"index": 0, "message": {"role": "assistant", "content": reply(body)}}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "StandInServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
