"""Prompt extension: a tiny random causal LM and vision-language model through the transformers
auto classes, and a stand-in OpenAI-compatible server. Checked: what the model is asked (the
dataset's captions as examples, the user's prompt, the image), what is kept, and the fallbacks."""

import numpy as np
import pytest
from language_stand_ins import StandInServer

from sora_dist.errors import ConfigError
from sora_dist.prompt_extend import PromptExtender, clean_extension, example_captions, quoted_spans

LONG = ("A red blob glides steadily from the left edge of a dark frame to the right, leaving a faint trail, "
        "while the static camera holds the whole scene in view.")


def test_examples_come_from_the_dataset(synthetic_dir):
    examples = example_captions(str(synthetic_dir), count=3)
    assert len(examples) == 3 and len(set(examples)) == 3
    assert all(e.startswith("a ") for e in examples)  # the blob captions
    assert example_captions("/nonexistent") == []


def test_clean_extension_and_quotes():
    assert clean_extension('Caption: "A dog runs."\n\nNotes: more') == "A dog runs."
    assert quoted_spans('a sign that says "OPEN" and “NO PARKING”') == ["OPEN", "NO PARKING"]


def test_a_server_is_asked_with_examples_and_its_caption_is_used(synthetic_dir):
    examples = example_captions(str(synthetic_dir), count=2)
    with StandInServer(lambda body: f'"{LONG} A sign reads "OPEN"."') as server:
        extender = PromptExtender(server.url, examples)
        prompt, record = extender.extend('a blob and a sign that says "OPEN"', seed=7)
    assert prompt == f'{LONG} A sign reads "OPEN".' and "fell_back" not in record
    body = server.requests[0]
    system, user = body["messages"][0]["content"], body["messages"][1]["content"]
    assert all(e in system for e in examples) and "quotation marks" in system and "camera" in system
    assert user[-1]["text"] == 'a blob and a sign that says "OPEN"' and body["seed"] == 7 and body["temperature"] > 0
    assert record["model"].startswith("stand-in-vlm at ") and record["extended"] == prompt


def test_a_lost_quote_or_an_empty_answer_falls_back_to_the_prompt():
    with StandInServer(lambda body: LONG) as server:
        prompt, record = PromptExtender(server.url, []).extend('a sign that says "OPEN"')
    assert prompt == 'a sign that says "OPEN"' and record["fell_back"] == "the answer lost the quoted text 'OPEN'"
    with StandInServer(lambda body: "  ") as server:
        prompt, record = PromptExtender(server.url, []).extend("a dog")
    assert prompt == "a dog" and record["fell_back"] == "empty answer"


def test_local_models_text_and_image(tiny_lm, tiny_vlm):
    extender = PromptExtender(str(tiny_lm), ["a red ball moves left"], device="cpu", max_new_tokens=12)
    first, record = extender.extend("a person walks", seed=3)
    again, _ = extender.extend("a person walks", seed=3)
    other, _ = extender.extend("a person walks", seed=4)
    assert first == again != other  # a seed makes sampling repeatable
    assert first == record["extended"] and first and "fell_back" not in record and (record["seed"], record["examples"]) == (3, 1)
    image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    prompt, record = PromptExtender(str(tiny_vlm), [], with_image=True, device="cpu", max_new_tokens=8).extend("it moves", image)
    assert prompt == record["extended"] and prompt and "fell_back" not in record
    with pytest.raises(ConfigError, match="could not be loaded as a vision-language model"):
        PromptExtender(str(tiny_lm), [], with_image=True, device="cpu")
    with pytest.raises(ConfigError, match="does not answer"):
        PromptExtender("http://127.0.0.1:9/v1", [])


def test_training_samples_extend_their_prompts_once(synthetic_dir, tmp_path):
    from sora_dist.config import load_config
    from sora_dist.data import read_manifest
    from sora_dist.sample import TrainingSamples

    # answers in the synthetic text encoder's words
    with StandInServer(lambda body: f"a large {body['messages'][1]['content'][-1]['text'].split()[1]} blob moving right") as server:
        cfg = load_config(None, [f"--data.path={synthetic_dir}", f"--train.out_dir={tmp_path}", "--train.sample_prompts=[a red blob,a blue blob]",
                                 f"--train.sample_prompt_extend={server.url}", "--train.sample_shape=[1,4,4]"])
        samples = TrainingSamples(cfg, read_manifest(synthetic_dir), cfg.model.text_dim or 32)
    assert [prompt for prompt, _ in samples.cases] == ["a large red blob moving right", "a large blue blob moving right"]
    assert len(server.requests) == 2 and all(r["seed"] == cfg.train.seed for r in server.requests)
