"""Tiny reward models with random weights, written in each kind's REAL file format, for tests
and CPU experiments: `make_tiny_reward(kind, out_dir)` returns the RewardConfig that loads them
through the same code a real checkpoint goes through."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import torch

from megadiff.config import RewardConfig

TINY_EMBED = 32


def tiny_open_clip_config(image_size: int = 64, quick_gelu: bool = False,
                          patch_size: int | None = None, context_length: int = 77) -> dict:
    """A 2-layer ViT / 2-layer text open_clip config; the vocabulary is ViT-H-14's, so open_clip's
    bundled tokenizer (and HPSv2's) serve it unchanged."""
    return {
        "embed_dim": TINY_EMBED,
        "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": 64, "head_width": 32,
                       "patch_size": patch_size or (16 if image_size <= 64 else 32)},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 2},
    }


def build_tiny_tower(cfg: dict, seed: int):
    from megadiff.rewards.open_clip_reward import build_open_clip

    with torch.random.fork_rng():        # no side effect on the caller's RNG
        torch.manual_seed(seed)
        return build_open_clip(cfg)


def tiny_aesthetic_mlp(in_dim: int, seed: int):
    from megadiff.rewards.aesthetic import AestheticMLP

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AestheticMLP([in_dim, 1024, 128, 64, 16, 1])


def write_reward(kind: str, out: Path, tower, cfg: dict, head=None) -> RewardConfig:
    """Save an open_clip `tower` (and the aesthetic `head`) in `kind`'s real file format."""
    out.mkdir(parents=True, exist_ok=True)
    tower_dir = out / "clip-l" if kind == "aesthetic" else out
    tower_dir.mkdir(parents=True, exist_ok=True)
    arch = tower_dir / "open_clip_config.json"
    arch.write_text(json.dumps({"model_cfg": cfg}, indent=1))
    sd = {k: v.detach().clone() for k, v in tower.state_dict().items()}
    if kind == "hpsv2":
        path = out / "HPS_v2.1_compressed.pt"
        torch.save({"state_dict": sd}, path)
        return RewardConfig(kind="hpsv2", path=str(path), arch=str(arch))
    tower_file = tower_dir / "open_clip_pytorch_model.bin"
    torch.save(sd, tower_file)
    if kind == "clip":
        return RewardConfig(kind="clip", path=str(tower_file), arch=str(arch))
    assert kind == "aesthetic" and head is not None, kind
    path = out / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(head.state_dict(), path)
    return RewardConfig(kind="aesthetic", path=str(path), arch=str(arch), clip_path=str(tower_file))


def make_tiny_reward(kind: str, out_dir: str | os.PathLike, seed: int = 0,
                     image_size: int = 64) -> RewardConfig:
    """Write a random tiny `kind` reward under out_dir in its real format; return its config.
    hpsv2: HPS_v2.1_compressed.pt = {'state_dict': open_clip state dict}; clip:
    open_clip_pytorch_model.bin (plain state dict, quick-GELU like DFN5B); aesthetic: the LAION
    MLP .pth (real widths, tiny input) + an open_clip tower in clip-l/; pickscore: a transformers
    CLIPModel directory with its processor and tokenizer."""
    out = Path(out_dir)
    if kind == "pickscore":
        out.mkdir(parents=True, exist_ok=True)
        return _make_tiny_pickscore(out, seed, image_size)
    if kind not in ("hpsv2", "clip", "aesthetic"):
        raise ValueError(f"no tiny builder for reward kind {kind!r}: use hpsv2, clip, aesthetic or pickscore")
    cfg = tiny_open_clip_config(image_size, quick_gelu=kind != "hpsv2")
    head = tiny_aesthetic_mlp(TINY_EMBED, seed + 1) if kind == "aesthetic" else None
    return write_reward(kind, out, build_tiny_tower(cfg, seed), cfg, head)


def _make_tiny_pickscore(out: Path, seed: int, image_size: int) -> RewardConfig:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from megadiff.models.tiny import _clip_tokenizer

    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=49407,
                         bos_token_id=49406, pad_token_id=49407),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, image_size=image_size, patch_size=16),
        projection_dim=TINY_EMBED)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.eval().save_pretrained(out)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=image_processor, tokenizer=_clip_tokenizer(out)).save_pretrained(out)
    return RewardConfig(kind="pickscore", path=str(out))


# ---- a reward whose optimum is known: a tiny tower trained to read colours ---------------------
COLOUR_REWARD_VERSION = 3
COLOUR_IMAGE_SIZE = 32
COLOUR_STEPS = 400


def colour_rgb(name: str) -> torch.Tensor:
    from megadiff.data.synthetic import COLOURS

    if name not in COLOURS:
        raise ValueError(f"colour {name!r} is unknown: choose one of {', '.join(COLOURS)}")
    return torch.tensor(COLOURS[name], dtype=torch.float32) / 255


def colour_shapes(n: int, g: torch.Generator, size: int = COLOUR_IMAGE_SIZE):
    """n images [n, 3, size, size] in [0, 1] of a jittered `fg` square or circle on a `bg` field
    (megadiff.data.synthetic's colours and shapes), with their (fg, shape, bg) indices."""
    from megadiff.data.synthetic import COLOURS, SHAPES

    palette = torch.stack([colour_rgb(c) for c in COLOURS])               # [C, 3]
    nc = len(palette)
    fg = torch.randint(nc, (n,), generator=g)
    bg = (fg + torch.randint(1, nc, (n,), generator=g)) % nc
    shape = torch.randint(len(SHAPES), (n,), generator=g)
    r = (torch.rand(n, generator=g) * (1 / 3 - 1 / 6) + 1 / 6) * size
    cx = r + torch.rand(n, generator=g) * (size - 2 * r)
    cy = r + torch.rand(n, generator=g) * (size - 2 * r)
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    rr = r[:, None, None]
    circle = dx ** 2 + dy ** 2 <= rr ** 2
    square = (dx.abs() <= rr) & (dy.abs() <= rr)
    mask = torch.where((shape == SHAPES.index("circle"))[:, None, None], circle, square)[:, None]
    jitter = lambda: (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.16
    img = torch.where(mask, palette[fg][..., None, None] + jitter(), palette[bg][..., None, None] + jitter())
    img = img + torch.randn(img.shape, generator=g) * 0.02
    return img.clamp(0, 1), fg, shape, bg


def control_words() -> tuple[list[str], list[str]]:
    """DMDR's SRPO control words (SRPOConfig's defaults): the tower reads the positive ones as
    "a clean image" and the negative ones as "a washed-out image" (see `wash_out`)."""
    from megadiff.config import SRPOConfig

    cfg = SRPOConfig()
    return list(cfg.positive), list(cfg.negative)


def wash_out(images: torch.Tensor, amount: torch.Tensor) -> torch.Tensor:
    """Blend images [B, 3, H, W] towards mid grey by amount [B] (0: unchanged)."""
    a = amount.to(images)[:, None, None, None]
    return (1 - a) * images + a * 0.5


def colour_captions():
    """Every caption the tower is trained on, with the (fg, shape, bg, style) it names (bg -1:
    any; style 0: any, 1: clean (a positive control word prefix, "Realistic. a red square"),
    2: washed out (a negative one, "Oil. a red square"))."""
    from megadiff.data.synthetic import COLOURS, SHAPES

    names = list(COLOURS)
    positive, negative = control_words()
    prefixes = [("", 0)] + [(f"{w}. ", 1) for w in positive] + [(f"{w}. ", 2) for w in negative]
    caps, keys = [], []
    for prefix, style in prefixes:
        for f, c in enumerate(names):
            for s, shape in enumerate(SHAPES):
                caps.append(f"{prefix}a {c} {shape}")
                keys.append((f, s, -1, style))
                for b, bc in enumerate(names):
                    if b != f:
                        caps.append(f"{prefix}a {c} {shape} on a {bc} background")
                        keys.append((f, s, b, style))
    return caps, torch.tensor(keys)


def redness(images: torch.Tensor, colour: str, width: float = 0.25) -> torch.Tensor:
    """[B] mean over pixels of exp(-|x - c|^2 / (2 width^2)): 1 for an image all of colour c."""
    c = colour_rgb(colour).to(images)[None, :, None, None]
    return torch.exp(-((images - c) ** 2).sum(1) / (2 * width ** 2)).mean((1, 2))


def train_colour_tower(cfg: dict, seed: int, steps: int = COLOUR_STEPS, batch: int = 64, lr: float = 2e-3):
    """CLIP's contrastive loss (Radford et al. 2021) over (image, caption) with every caption that
    is true of an image counted as a positive (soft targets), both directions. Half the images
    are washed out (blended 35-70% towards grey) so that SRPO's control words mean something:
    "<positive word>. <caption>" is true of the clean ones, "<negative word>. <caption>" of the
    washed-out ones."""
    import torch.nn.functional as F

    from megadiff.rewards.open_clip_reward import open_clip_tokenizer
    from megadiff.rewards.preprocess import ImagePreprocess

    g = torch.Generator().manual_seed(seed)
    model = build_tiny_tower(cfg, seed)
    caps, keys = colour_captions()
    index = {c: i for i, c in enumerate(caps)}
    positive, negative = control_words()
    tokens = open_clip_tokenizer(cfg)(caps)
    pre = ImagePreprocess(size=cfg["vision_cfg"]["image_size"])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0)
    for _ in range(steps):
        img, fg, shape, bg = colour_shapes(batch, g)
        washed = torch.rand(batch, generator=g) < 0.5
        img = wash_out(img, washed * (0.35 + 0.35 * torch.rand(batch, generator=g)))
        style = 1 + washed.long()
        # random captions, plus each image's own full caption (so every row has a positive) and
        # that caption after one positive and one negative control word (the style contrast)
        own = [_caption(int(f), int(s), int(b)) for f, s, b in zip(fg, shape, bg)]
        pw = torch.randint(len(positive), (batch,), generator=g).tolist()
        nw = torch.randint(len(negative), (batch,), generator=g).tolist()
        pick = torch.cat([torch.randint(len(caps), (batch,), generator=g), torch.tensor(
            [index[c] for c in own] + [index[f"{positive[i]}. {c}"] for i, c in zip(pw, own)]
            + [index[f"{negative[i]}. {c}"] for i, c in zip(nw, own)])])
        k = keys[pick]
        match = (fg[:, None] == k[None, :, 0]) & (shape[:, None] == k[None, :, 1]) & (
            (k[None, :, 2] == -1) | (bg[:, None] == k[None, :, 2])) & (
            (k[None, :, 3] == 0) | (style[:, None] == k[None, :, 3]))
        fi = F.normalize(model.encode_image(pre(img)), dim=-1)
        uniq, inv = torch.unique(pick, return_inverse=True)     # encode each caption once
        ft = F.normalize(model.encode_text(tokens[uniq]), dim=-1)[inv]
        logits = model.logit_scale.exp() * fi @ ft.T
        t = match.float()
        cols = t.sum(0) > 0          # captions with at least one matching image
        loss = (F.cross_entropy(logits, t / t.sum(1, keepdim=True))
                + F.cross_entropy(logits.T[cols], (t.T / t.sum(0).clamp(min=1)[:, None])[cols])) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), loss.item()


def _caption(f: int, s: int, b: int) -> str:
    from megadiff.data.synthetic import COLOURS, SHAPES

    names = list(COLOURS)
    return f"a {names[f]} {SHAPES[s]} on a {names[b]} background"


def train_colour_head(tower, colour: str, seed: int, in_dim: int, steps: int = 300, batch: int = 128):
    """The LAION MLP regressed (MSE, as the predictor was trained) onto `redness` of images from
    colour_shapes blended towards `colour` by a random amount, read through the frozen tower."""
    import torch.nn.functional as F

    from megadiff.rewards.preprocess import ImagePreprocess

    g = torch.Generator().manual_seed(seed + 7)
    head = tiny_aesthetic_mlp(in_dim, seed + 1)
    pre = ImagePreprocess(size=COLOUR_IMAGE_SIZE)
    c = colour_rgb(colour)[None, :, None, None]
    with torch.no_grad():
        img = colour_shapes(batch * 8, g)[0]
        a = torch.rand(img.shape[0], 1, 1, 1, generator=g)
        img = (1 - a) * img + a * c
        feats = F.normalize(tower.encode_image(pre(img)), dim=-1)
        target = redness(img, colour)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    for _ in range(steps):
        i = torch.randint(feats.shape[0], (batch,), generator=g)
        loss = F.mse_loss(head(feats[i]).squeeze(-1), target[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval(), loss.item()


def colour_tower_config() -> dict:
    """32 px, 16 text tokens, plain GELU for every kind (the arch JSON saved with it says so)."""
    return tiny_open_clip_config(COLOUR_IMAGE_SIZE, patch_size=8, context_length=16)


@functools.lru_cache(maxsize=4)
def _colour_tower_state(seed: int) -> dict:
    """One trained tower per seed and process, shared by every kind and colour."""
    return train_colour_tower(colour_tower_config(), seed)[0].state_dict()


def make_colour_reward(out_dir: str | os.PathLike, kind: str = "hpsv2", colour: str = "red",
                       seed: int = 0) -> RewardConfig:
    """A reward whose optimum is known, in `kind`'s real format (hpsv2, clip or aesthetic).

    The open_clip tower (32 px, 16 text tokens) is trained contrastively on `colour_shapes`
    with their captions ("a red square", "a red square on a blue background"), so for
    hpsv2/clip the score of an image against "a red square" rises with its redness; half its
    training images are washed out towards grey and captioned with DMDR's negative SRPO words
    ("Oil. a red square"), the clean half with the positive ones ("Realistic. a red square"),
    so SRPO's relative score prefers clean, saturated images. For aesthetic, the LAION MLP on
    that tower regresses `redness(image, colour)`: the optimum is an image all of `colour`,
    whatever the prompt. Deterministic in `seed` for one thread setup (BLAS kernels vary with
    OMP_NUM_THREADS); cached in out_dir (colour_reward.json is written last and checked on
    reuse) and the trained tower in the process (one per seed for all kinds and colours);
    20-60 s on one CPU thread.
    """
    colour_rgb(colour)
    if kind not in ("hpsv2", "clip", "aesthetic"):
        raise ValueError(f"make_colour_reward: kind={kind!r} must be hpsv2, clip or aesthetic")
    out = Path(out_dir)
    meta = {"version": COLOUR_REWARD_VERSION, "kind": kind, "colour": colour, "seed": seed}
    meta_file = out / "colour_reward.json"
    if meta_file.is_file() and json.loads(meta_file.read_text()).get("meta") == meta:
        return RewardConfig(**json.loads(meta_file.read_text())["config"])
    cfg = colour_tower_config()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)       # tiny ops: one thread is several times faster on a busy CPU
    try:
        tower = build_tiny_tower(cfg, seed)
        tower.load_state_dict(_colour_tower_state(seed))
        tower.eval()
        head = train_colour_head(tower, colour, seed, TINY_EMBED)[0] if kind == "aesthetic" else None
    finally:
        torch.set_num_threads(threads)
    rc = write_reward(kind, out, tower, cfg, head)
    tmp = meta_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "config": dataclasses.asdict(rc)}, indent=1))
    os.replace(tmp, meta_file)
    return rc
