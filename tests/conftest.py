import os

os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("WANDB_DISABLE_CODE", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: one thread avoids contention overhead on a 2-core machine


@pytest.fixture(autouse=True)
def _close_wandb_run():
    """A test that fails mid-fit must not leave its W&B run open for the next test to reuse."""
    yield
    from mia_lightning.wandb_setup import finish_wandb

    finish_wandb()


@pytest.fixture
def fit(tmp_path):
    """Run ``python -m mia_lightning fit`` in-process with a run folder under tmp_path; returns the run folder."""
    from mia_lightning.cli import main
    from mia_lightning.run import RunFolder

    def run(*args: str, run_name: str = "t", runs_dir=None) -> RunFolder:
        runs_dir = runs_dir or tmp_path / "runs"
        main(["fit", "--runs_dir", str(runs_dir), "--run_name", run_name, *args])
        return RunFolder(runs_dir / run_name)

    return run
