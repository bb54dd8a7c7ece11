"""Live logging sinks (harness.training.sinks): TensorBoard event files read back with TensorBoard's own
reader hold the values the record stores, a grid's hyper-parameters are readable in its HParams
data, W&B logs offline with nothing reaching the network, and a tracker that is missing or fails
never fails a run."""
import io
import json
import socket
import struct
import sys

import pytest
from rich.console import Console
from typer.testing import CliRunner

import ablate
from harness.execution import grid as G
from harness.training import sinks as S
from harness.execution.grid import run_grid
from harness.training.plan import RunSpec
from harness.training.runner import train
from harness.runs.store import ResultsStore

#: what the sinks log is checked, not the model: two epochs of a small dualvgr (module_dim 16)
FAST = {"epochs": 2, "batch_size": 512, "overrides": {"module_dim": 16}}


def expected_scalars(entry: dict) -> dict[str, float]:
    """What each epoch must show, written out here from a history entry (not by harness.training.sinks)."""
    out = {"train/loss": entry["loss"], "train/acc": entry["train_acc"], "train/lr": entry["lr"],
           "train/samples_per_s": entry["train_samples_per_s"], "train/time_s": entry["train_time_s"],
           "val/acc": entry["val_acc"]}
    out.update({f"train/{k}": v for k, v in entry.items() if k.startswith("loss_")})
    out.update({f"val/acc_{t}": v for t, v in entry["val_acc_per_type"].items()})
    return out


def accumulator(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / S.TENSORBOARD_DIR), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_unknown_sink_is_refused_naming_it(data_cache, tmp_path):
    with pytest.raises(S.LogSinkError, match="'mlflow'.*known: tensorboard, wandb"):
        S.check_sinks(["tensorboard", "mlflow"])
    res = CliRunner().invoke(ablate.app, ["run", "dualvgr", "--log", "mlflow", "--results", str(tmp_path)])
    assert res.exit_code == 2 and "mlflow" in res.output
    grid = tmp_path / "g.toml"
    grid.write_text('variants = ["dualvgr"]\n[log]\ntensorboard = "yes"\n')
    with pytest.raises(G.GridError, match=r"\[log\] tensorboard = 'yes' is not true or false"):
        G.load(grid)
    grid.write_text('variants = ["dualvgr"]\n[log]\nmlflow = true\n')
    with pytest.raises(G.GridError, match=r"\[log\] has unknown key 'mlflow'"):
        G.load(grid)
    grid.write_text('variants = ["dualvgr"]\n[log]\nwandb = true\ntensorboard = false\n')
    assert G.load(grid).log == ("wandb",)


@pytest.mark.slow
def test_cli_run_log_tensorboard_writes_the_record_values(data_cache, tmp_path):
    pytest.importorskip("tensorboard")
    res = CliRunner().invoke(ablate.app, ["run", "dualvgr", "--epochs", "2", "--batch-size", "512", "--seed", "5",
                                          "--set", "module_dim=16", "--device", "cpu", "--results", str(tmp_path),
                                          "--log", "tensorboard"])
    assert res.exit_code == 0, res.output
    (rec,) = ResultsStore(tmp_path).records()
    ea = accumulator(ResultsStore(tmp_path).run_dir(rec["run_id"]))
    assert len(rec["history"]) == 2
    for entry in rec["history"]:
        want = expected_scalars(entry)
        assert {"val/acc_what", "train/samples_per_s"} <= set(want)
        for tag, v in want.items():
            (ev,) = [e for e in ea.Scalars(tag) if e.step == entry["epoch"]]
            assert ev.value == pytest.approx(v, rel=1e-6), tag
    (final,) = ea.Scalars("final/test_acc")
    assert final.value == pytest.approx(rec["metrics"]["test"]["overall"], rel=1e-6)


def hparams_of(run_dir) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = accumulator(run_dir).PluginTagToContent("hparams")
    for blob in content.values():
        data = plugin_data_pb2.HParamsPluginData.FromString(blob)
        if data.HasField("session_start_info"):
            return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
                    for k, v in data.session_start_info.hparams.items()}
    raise AssertionError(f"no session start info among {list(content)}")


@pytest.mark.slow
def test_grid_log_tensorboard_hparams_compare_its_runs(data_cache, tmp_path):
    pytest.importorskip("tensorboard")
    grid = tmp_path / "watched.toml"
    grid.write_text('variants = ["dualvgr"]\nseeds = [1, 2]\ndata = "synthetic:tiny"\n'
                    '[train]\nepochs = 1\nbatch_size = 512\n[set]\nmodule_dim = 16\n[log]\ntensorboard = true\n')
    store = ResultsStore(tmp_path / "results")
    res = run_grid(G.load(grid), store, device="cpu", console=Console(file=io.StringIO()))
    assert len(res.complete) == 2
    seen = {}
    for rid in res.complete:
        rec = store.read_record(rid)
        hp = hparams_of(store.run_dir(rid))
        assert hp["run_id"] == rid and hp["variant"] == "dualvgr" and hp["teachers"] == "none"
        assert hp["data"] == rec["data"]["id"] and hp["set.module_dim"] == 16 and hp["train.epochs"] == 1
        seen[hp["seed"]] = rid
    assert set(seen) == {1, 2}


def wandb_records(path):
    """Every record of a W&B run file (LevelDB log format after a 7-byte W&B header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, out = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            out.append(pb.Record.FromString(buf))
            buf = b""
    return out


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """W&B configured by nothing, every cache in tmp_path, proxies that go nowhere, and no socket of
    this process may connect anywhere but this machine."""
    for k in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT"):
        monkeypatch.delenv(k, raising=False)
    for k in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "HOME"):
        monkeypatch.setenv(k, str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for k in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(k, "http://127.0.0.1:9")
    real = socket.socket.connect

    def local_only(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"a connection to {address} was attempted")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)


@pytest.mark.slow
def test_wandb_logs_offline_without_network(tiny, tmp_path, no_network):
    pytest.importorskip("wandb")
    assert S.wandb_mode()[0] == "offline"
    with pytest.MonkeyPatch.context() as mp:  # online asked for, but no key: offline, never a login prompt
        mp.setenv("WANDB_MODE", "online")
        assert S.wandb_mode()[0] == "offline"
        (tmp_path / "netrc").write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
        mp.setenv("NETRC", str(tmp_path / "netrc"))
        assert S.wandb_mode()[0] == "online"
    out = io.StringIO()
    store = ResultsStore(tmp_path / "results")
    # the full model at batch 128, as before: on a loaded machine the offline run file read right after train()
    # returned sometimes held fewer history rows than epochs (wandb's writer had not caught up), at either size
    rec = train(RunSpec(variant="dualvgr", data="synthetic:tiny", seed=7, epochs=2, batch_size=128), store, data=tiny,
                device="cpu", progress=False, log=("wandb",), console=Console(file=out, width=300))
    assert "wandb: offline" in out.getvalue()
    (run_file,) = store.run_dir(rec["run_id"]).glob("wandb/offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history[items["_step"]] = items
    assert sorted(history) == [0, 1]
    for entry in rec["history"]:
        for tag, v in expected_scalars(entry).items():
            assert history[entry["epoch"]][tag] == pytest.approx(v, rel=1e-9), tag
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["run_id"] == rec["run_id"] and config["seed"] == 7 and config["teachers"] == "none"


class _Broken:
    def __init__(self, *a, **k):
        pass

    def epoch(self, entry):
        raise OSError("disk full")


def test_missing_or_failing_tracker_warns_and_the_run_completes(tiny, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    monkeypatch.setattr(S, "_TensorBoard", _Broken)
    out = io.StringIO()
    rec = train(RunSpec(variant="dualvgr", data="synthetic:tiny", seed=8, epochs=1, batch_size=512,
                        overrides={"module_dim": 16}),
                ResultsStore(tmp_path), data=tiny, device="cpu", progress=False, log=("tensorboard", "wandb"),
                console=Console(file=out, width=300))
    assert rec["status"] == "complete"
    lines = out.getvalue().splitlines()
    assert any("wandb: not installed" in ln for ln in lines), lines
    assert any("tensorboard: logging failed (OSError: disk full)" in ln for ln in lines), lines
