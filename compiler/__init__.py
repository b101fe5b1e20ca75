"""llama3gen: compile a pre-training budget into a compute-optimal LLaMA-3 training repo.

The pipeline runs one way: spec (what the user wrote) → Plan (everything decided) → files.
Importing the package is cheap and never imports torch.
"""

__version__ = "0.1.0"
