"""Nothing of ours stays in the system's temp folder: tokenizer builds, training runs and bench runs, also failed ones.

Each check runs in a fresh interpreter whose TMPDIR is a new, empty folder (so nothing cached by an earlier test in
this process can hide a folder that a first build would leave).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent

SCRIPT = """
import sys
from pathlib import Path

import pytest

from dreambooth.errors import DreamBoothError
from dreambooth.models.tiny import write_tiny_checkpoint
from dreambooth.models.tokenizer import clip_tokenizer
from dreambooth.settings import Concept, Settings
from dreambooth.demo import draw_instance_images
from dreambooth.train import loop
from dreambooth import bench

work = Path(sys.argv[1])
what = sys.argv[2]

if what == "tokenizer":
    assert clip_tokenizer("sd1")("dog").input_ids == [49406, 1929, 49407]
    assert clip_tokenizer("sd2", max_length=64).model_max_length == 64
elif what == "tokenizer-fails":
    import os
    (work / "bad.txt.gz").write_bytes(b"not gzip")
    os.environ["DREAMBOOTH_CLIP_BPE"] = str(work / "bad.txt.gz")
    try:
        clip_tokenizer("sd1")
    except Exception as error:
        print("failed as expected:", type(error).__name__)
    else:
        raise SystemExit("a corrupt vocabulary file loaded")
elif what in ("train", "train-fails"):
    base = write_tiny_checkpoint(work / "models", "sd1")
    draw_instance_images(work / "instance", count=2, size=64)
    settings = Settings(
        pretrained_model_name_or_path=str(base),
        output_dir=str(work / "out"),
        resolution=64,
        max_train_steps=2,
        n_save_sample=0,
        concepts=[Concept(instance_data_dir=str(work / "instance"), instance_prompt="photo of zwx ring")],
    )
    if what == "train-fails":
        def broken(self, *args, **kwargs):
            raise RuntimeError("a step failed")
        loop.Trainer._loss = broken
        with pytest.raises(Exception):
            loop.Trainer(settings).run()
    else:
        assert loop.Trainer(settings).run().step == 2
elif what in ("bench", "bench-fails"):
    spec = {"scale": "tiny64", "prior": True, "train_text": False, "batch": 1, "steps": 2, "warmup": 0}
    if what == "bench-fails":
        def broken(self):
            raise RuntimeError("a step failed")
        loop.Trainer.run = broken
        with pytest.raises(RuntimeError, match="a step failed"):
            bench.measure_one({**spec, "mode": "default"})
    else:
        for mode in ("default", "floor"):  # naive runs the same code as default, without the caches
            assert bench.measure_one({**spec, "mode": mode})["seconds_per_step"] > 0
print("done", what)
"""


@pytest.mark.slow
@pytest.mark.parametrize("what", ["tokenizer", "tokenizer-fails", "train", "train-fails", "bench", "bench-fails"])
def test_nothing_of_ours_stays_in_the_temp_folder(tmp_path, what):
    temp, work = tmp_path / "tmp", tmp_path / "work"
    temp.mkdir()
    work.mkdir()
    env = {
        **os.environ,
        "TMPDIR": str(temp),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": str(REPOSITORY),
    }
    env.pop("DREAMBOOTH_CLIP_BPE", None)
    output = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), str(work), what],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert output.returncode == 0, output.stderr[-3000:]
    assert f"done {what}" in output.stdout
    # torch keeps one compile cache per user there (torchinductor_USER, shared and reused): not ours
    assert sorted(p.name for p in temp.iterdir() if not p.name.startswith("torchinductor_")) == []
