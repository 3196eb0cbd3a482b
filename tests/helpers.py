"""What many tests share: the config directory and the arguments that keep CLI runs tiny."""

from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "lightning_configs"

# Keep CLI runs tiny: a couple of batches, no sanity validation, no progress output.
FAST = [
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=2",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.log_every_n_steps=1",
]
