"""megadiff: a DeepSpeed-native trainer for Stable Diffusion 3 / 3.5."""
from setuptools import find_packages, setup

# The pins below are one working set (seen together on CPU and CUDA); unpinned, pip
# backtracks for 10+ minutes because mosaicml-streaming 0.13 caps transformers < 5 and
# numpy < 2.2, which caps huggingface_hub < 1 and so diffusers < 0.40.
# torch/torchvision keep a range so a cluster can bring its own CUDA build.
INSTALL_REQUIRES = [
    "torch>=2.4,<2.15",
    "torchvision>=0.19,<0.30",
    "deepspeed==0.19.8",
    "diffusers==0.39.0",
    "transformers==4.57.6",
    "huggingface_hub==0.36.2",
    "mosaicml-streaming==0.13.0",
    "open_clip_torch==3.3.0",
    "timm==1.0.31",
    "peft==0.21.2",
    "sentencepiece==0.2.3",
    "wandb==0.31.0",
    "safetensors==0.8.0",
    "numpy==2.1.3",
    "protobuf>=5,<8",
    "pyyaml>=6",
    "pillow>=10",
    "tqdm>=4.66",
    "pyarrow>=14",
    "torch-fidelity==0.4.0",     # FID/KID in `megadiff eval` (local Inception weights only)
]

setup(
    name="megadiff",
    version="0.1.0",
    description="DeepSpeed-native trainer for Stable Diffusion 3 / 3.5",
    python_requires=">=3.10",
    packages=find_packages(include=["megadiff", "megadiff.*", "data_tools", "data_tools.*"]),
    package_data={"megadiff": ["recipes/*.yaml", "ds_configs/*.json"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    # hps: HPSv2's own scoring code for tests/test_rewards_hps.py; hpsv2x itself goes in with
    # `pip install --no-deps hpsv2x==1.2.0` (its pins protobuf<4, pytest==7.2.0 break wandb/pytest)
    extras_require={"test": ["pytest>=8", "pytest-timeout>=2.3"],
                    "hps": ["clint==0.5.1", "args==0.1.0", "braceexpand==0.1.7", "webdataset==1.0.2"]},
    entry_points={"console_scripts": ["megadiff=megadiff.cli:main"]},
)
