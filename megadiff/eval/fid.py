"""FID and KID of generated images against a reference folder, with torch-fidelity
(toshas/torch-fidelity 0.4.0: `torch_fidelity.calculate_metrics`, feature extractor
`inception-v3-compat`, the TF-Inception port of pytorch-fid / the original TTUR FID code).

Nothing downloads: the Inception weights are a local file the user gives
(`--inception PATH`, the `weights-inception-2015-12-05-6726825d.pth` torch-fidelity would
otherwise fetch, or any state dict of `FeatureExtractorInceptionV3`), passed to
torch-fidelity as `feature_extractor_weights_path`. torch-fidelity reads that file with
`torch.load(weights_only=False)` (pickle); megadiff first loads it with `weights_only=True`
and refuses anything that is not a plain state dict of tensors with Inception's keys, so
no pickled code reaches the library.

FID (Heusel et al. 2017): ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) on the
2048-d pool features. KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial
kernel (x.y / d + 1)^3, averaged over `kid_subsets` random subsets of `kid_subset_size`
(min(1000, smaller set size)) samples.

Images: when every image of both sets has one size they go in as they are (torch-fidelity
resizes to 299 x 299 itself, TF-1.x bilinear); otherwise each is resized (shorter side) and
centre-cropped to `resize` pixels (torch-fidelity's `samples_resize_and_crop`).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

FEATURE_EXTRACTOR = "inception-v3-compat"
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
DEFAULT_RESIZE = 299


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)


def check_inception_weights(path: str | Path) -> Path:
    """One-line ValueError unless `path` is a tensor-only state dict of torch-fidelity's
    FeatureExtractorInceptionV3 (loaded with weights_only=True: no pickled code runs)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"Inception weights {p} do not exist: give the local file "
                         "weights-inception-2015-12-05-6726825d.pth (torch-fidelity's InceptionV3)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:   # truncated, not a torch file, or pickled objects beyond tensors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"Inception weights {p} cannot be read as a tensor-only state dict ({first[:120]}): "
                         "give torch-fidelity's weights-inception-2015-12-05-6726825d.pth") from None
    if not isinstance(state, dict) or "fc.weight" not in state or "Conv2d_1a_3x3.conv.weight" not in state:
        raise ValueError(f"Inception weights {p} are not a state dict of torch-fidelity's "
                         "FeatureExtractorInceptionV3 (no Conv2d_1a_3x3 / fc keys)")
    return p


def _sizes(files: list[Path]) -> set[tuple[int, int]]:
    from PIL import Image

    out = set()
    for f in files:
        with Image.open(f) as im:
            out.add(im.size)
    return out


def fid_kid(generated: str | Path, reference: str | Path, weights: str | Path, batch_size: int = 32,
            kid_subsets: int = 100, resize: int | None = None, seed: int = 2020,
            feature_layer: str = "2048") -> dict:
    """{"fid", "kid_mean", "kid_std", "n_generated", "n_reference", "kid_subset_size", "resize"}.

    `feature_layer`: Inception features FID and KID use ("2048", the standard pool features;
    "64", "192", "768" are cheaper: FID's matrix square root is O(d^3))."""
    import torch_fidelity

    gen, ref = Path(generated), Path(reference)
    for name, d in (("generated images", gen), ("--fid-reference", ref)):
        if not d.is_dir():
            raise ValueError(f"{name} folder {d} does not exist: give a folder of .png/.jpg images")
    weights = check_inception_weights(weights)
    g_files, r_files = image_files(gen), image_files(ref)
    if len(g_files) < 2 or len(r_files) < 2:
        raise ValueError(f"FID needs at least 2 images on each side ({len(g_files)} generated in {gen}, "
                         f"{len(r_files)} in {ref}): add prompts or reference images")
    if resize is None:
        resize = 0 if len(_sizes(g_files) | _sizes(r_files)) == 1 else DEFAULT_RESIZE
    subset = min(1000, len(g_files), len(r_files))
    with tempfile.TemporaryDirectory(prefix="megadiff-fid-") as cache:
        m = torch_fidelity.calculate_metrics(
            input1=str(gen), input2=str(ref), fid=True, kid=True, feature_extractor=FEATURE_EXTRACTOR,
            feature_extractor_weights_path=str(weights), cuda=torch.cuda.is_available(),
            batch_size=batch_size, kid_subset_size=subset, kid_subsets=kid_subsets,
            feature_layer_fid=feature_layer, feature_layer_kid=feature_layer,
            samples_resize_and_crop=resize, cache=False, cache_root=cache, rng_seed=seed,
            verbose=False, datasets_download=False,
            save_cpu_ram=(os.cpu_count() or 1) < 8)     # no loader worker processes on small machines
    return {"fid": float(m["frechet_inception_distance"]),
            "kid_mean": float(m["kernel_inception_distance_mean"]),
            "kid_std": float(m["kernel_inception_distance_std"]),
            "n_generated": len(g_files), "n_reference": len(r_files), "kid_subset_size": subset,
            "kid_subsets": kid_subsets, "resize": resize or None, "feature_layer": feature_layer}


def write_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """torch-fidelity's InceptionV3 with random (He-normal) weights, saved as the state dict
    file torch-fidelity reads: for tests and benchmarks on machines without the real weights.
    The features are meaningless, but FID/KID computed with them follow the same formulas."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Random(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None      # keep the random initialisation

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp, "empty.pth")
        torch.save({}, empty)
        net = _Random(FEATURE_EXTRACTOR, ["2048"], feature_extractor_weights_path=str(empty))
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.float().contiguous() for k, v in net.state_dict().items()}, out)
    return out
