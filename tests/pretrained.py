"""Tiny randomly initialized diffusers VAEs (image and video kinds) and transformers text
encoders, saved to folders and loaded with from_pretrained exactly like downloaded ones."""

from __future__ import annotations

from pathlib import Path

CAPTIONS = ["a red ball moves left", "a blue square grows", "green light flickers", "a dog runs on grass"]


def save_tokenizer(folder: Path) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CAPTIONS, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=16)
    fast.save_pretrained(folder)
    return fast.vocab_size


def save_encoding_models(root: Path) -> Path:
    """root/image_vae (AutoencoderKL), root/t5 (T5 encoder + tokenizer), and a pipeline layout:
    root/pipeline/{vae (Wan VAE), tokenizer, text_encoder (CLIP text)}."""
    import torch
    from diffusers import AutoencoderKL, AutoencoderKLWan
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=32).save_pretrained(root / "image_vae")
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
                     latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0]).save_pretrained(root / "pipeline" / "vae")
    vocab = save_tokenizer(root / "t5")
    T5EncoderModel(T5Config(vocab_size=vocab, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2, pad_token_id=0, eos_token_id=1)).save_pretrained(root / "t5")
    save_tokenizer(root / "pipeline" / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=24, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=1)).save_pretrained(root / "pipeline" / "text_encoder")
    return root
