"""A tiny SD3 model in the real diffusers layout, built from configs, for the demo and tests.

Every component is a real diffusers/transformers class saved with `save_pretrained`, and the
tokenizers are real tokenizer files (CLIP BPE from open_clip's bundled vocabulary, a
sentencepiece model trained on a few lines for T5), so loading goes through exactly the code a
real SD3/SD3.5 directory uses (`megadiff.models.sd3`).
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

# Latent/VAE geometry follows SD3 (16 latent channels, 8x downsampling, SD3's shift/scale).
TINY_TEXT_HIDDEN = 32        # CLIP-L and CLIP-G hidden size; their concat (64) = T5 d_model
TINY_T5_DIM = 64
TINY_T5_MAX_LENGTH = 32
TINY_RESOLUTION = 64         # pixels; latents are 16 x 8 x 8

_SPM_TRAINING_TEXT = [
    "a photo of a red square on a blue background",
    "a green circle next to a yellow triangle in the snow",
    "an astronaut riding a horse on the moon, highly detailed, 4k",
    "a watercolor painting of a small cottage by the lake at dawn",
    "close-up portrait of an old man with a white beard, studio lighting",
    "a bowl of fruit: apples, oranges, bananas and grapes on a wooden table",
]


def tiny_transformer_config() -> dict:
    return dict(
        sample_size=TINY_RESOLUTION // 8, patch_size=2, in_channels=16, out_channels=16,
        num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=TINY_T5_DIM, caption_projection_dim=32,
        pooled_projection_dim=2 * TINY_TEXT_HIDDEN, pos_embed_max_size=32,
    )


def _clip_tokenizer(out_dir: Path):
    """A CLIPTokenizer whose vocab/merges come from open_clip's bundled BPE file (ids match
    open_clip's tokenizer), the same construction as the original CLIP repository."""
    import open_clip.tokenizer as oct
    from transformers import CLIPTokenizer

    bpe_path = oct.default_bpe()
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(oct.bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = Path(tmp, "vocab.json"), Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
        merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        tok = CLIPTokenizer(str(vocab_file), str(merges_file), pad_token="<|endoftext|>",
                            model_max_length=77)
        tok.save_pretrained(out_dir)
    return tok


def _t5_tokenizer(out_dir: Path):
    import sentencepiece as spm
    from transformers import T5TokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp, "corpus.txt")
        corpus.write_text("\n".join(_SPM_TRAINING_TEXT * 4))
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp, "spiece")), vocab_size=80, hard_vocab_limit=False,
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram",
            character_coverage=1.0, minloglevel=2,
        )
        tok = T5TokenizerFast(vocab_file=str(Path(tmp, "spiece.model")), add_prefix_space=True,
                              from_slow=True, extra_ids=0, model_max_length=TINY_T5_MAX_LENGTH)
        tok.save_pretrained(out_dir)
        # Real SD3 directories ship spiece.model beside tokenizer.json; keep the same layout.
        shutil.copy(Path(tmp, "spiece.model"), Path(out_dir, "spiece.model"))
    return T5TokenizerFast.from_pretrained(out_dir)


def make_tiny_sd3(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write a complete tiny SD3 diffusers directory (what `StableDiffusion3Pipeline` reads)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, T5Config,
                              T5EncoderModel)

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty: choose a new directory for the tiny model")
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**tiny_transformer_config())
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), norm_num_groups=4, sample_size=TINY_RESOLUTION,
        use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5305,
    )
    tok_tmp = tempfile.TemporaryDirectory()
    tokenizer = _clip_tokenizer(Path(tok_tmp.name, "clip"))
    tokenizer_3 = _t5_tokenizer(Path(tok_tmp.name, "t5"))

    def clip(seed_offset: int) -> CLIPTextModelWithProjection:
        torch.manual_seed(seed + seed_offset)
        cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TINY_TEXT_HIDDEN,
                             intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             projection_dim=TINY_TEXT_HIDDEN, max_position_embeddings=77,
                             bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
        return CLIPTextModelWithProjection(cfg).eval()

    torch.manual_seed(seed + 3)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_3), d_model=TINY_T5_DIM, d_kv=16,
                                 d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0)).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=clip(1), tokenizer=tokenizer, text_encoder_2=clip(2), tokenizer_2=tokenizer,
        text_encoder_3=t5, tokenizer_3=tokenizer_3,
    )
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out)
    tok_tmp.cleanup()
    return out
