"""The names of what a run writes into its output directory (one definition each).

`train.output` describes the layout; readers of an output directory (`eval`, `export`,
resume) import the names from here, so a renamed file cannot go out of step.
"""
CONFIG_FILE = "config.yaml"  # the resolved options: `tunesmith train --config DIR/config.yaml` reruns
SUMMARY_FILE = "summary.json"  # the final figures; its presence marks the run as finished
HELD_OUT_FILE = "eval.jsonl"  # the held-out conversations (messages format)
METRICS_FILE = "metrics.jsonl"  # one JSON record per logged step / evaluation
PLOT_FILE = "loss.png"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"  # resumable step checkpoints
MERGED_DIR = "merged"  # a LoRA run's adapter folded into full weights (--merge)
