from setuptools import find_packages, setup

# Every package under sora_dist/ is found; kernels/ is installed as sora_dist.kernels (its
# package-dir is in pyproject.toml), not as a top-level ``kernels`` (an existing PyPI name).
setup(packages=[*find_packages(include=["sora_dist", "sora_dist.*"]), "sora_dist.kernels"])
