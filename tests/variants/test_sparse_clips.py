"""Node sparsity keeps whole clips: the kept count is in the record and the report
label, and a keep_ratio that keeps every clip is rejected."""
import pytest

import variants
from harness.report import write_report
from harness.training.plan import RunSpec
from harness.training.runner import train
from harness.runs.store import ResultsStore
from variants.dualvgr import kept_clips


def test_kept_clips_rounds_to_whole_clips():
    assert [kept_clips(r, 4) for r in (0.4, 0.6, 0.8)] == [2, 2, 3]
    assert [kept_clips(0.6, n) for n in (4, 8)] == [2, 5]  # what sparse-node's description says


@pytest.mark.parametrize("ratio, clips", [(0.9, 4), (0.95, 8), (0.875, 4)])
def test_a_keep_ratio_that_keeps_every_clip_is_rejected(ratio, clips):
    with pytest.raises(variants.ConfigError, match=rf"keep_ratio {ratio} keeps all {clips} clips"):
        variants.get_config("sparse-node", keep_ratio=ratio, num_clips=clips)
    variants.get_config("sparse-node", keep_ratio=1.0, num_clips=clips)  # dense is fine


def test_shipped_descriptions_state_the_kept_count_of_the_shipped_sizes():
    from harness.data.synthetic import PRESETS

    for name in ("sparse-node", "sparse-node-edge"):
        ratio = variants.get_config(name).model["keep_ratio"]
        for p in PRESETS.values():
            assert f"{kept_clips(ratio, p.n_clips)} of {p.n_clips}" in variants.describe(name), (name, p.name)


@pytest.mark.slow
def test_record_and_report_label_say_how_many_clips_were_kept(tiny, tmp_path):
    store = ResultsStore(tmp_path / "results")
    rec = train(RunSpec("sparse-node", epochs=1, batch_size=512, seed=0, overrides={"module_dim": 16}), store,
                device="cpu", progress=False)
    assert rec["clips"] == {"total": 4, "kept": 2}
    md = write_report(store, "sp", out_dir=tmp_path / "r").read_text()
    assert "| sparse-node (2 of 4 clips) |" in md
