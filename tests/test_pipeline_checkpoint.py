"""Checkpoint bookkeeping (pipeline.train.checkpoint) without DeepSpeed's engine: a stand-in engine
writes a tag's files the way `save_checkpoint` does (or dies half-way) and loads them back;
loads that go through torch.load use DeepSpeed's own TorchCheckpointEngine. Also the
torn-line handling of metrics.jsonl (pipeline.train.monitor)."""

from __future__ import annotations

import ast
import logging
import os
from pathlib import Path

import pytest
import torch

from pipeline.train import checkpoint

FILES = ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]


class FakeEngine:
    def __init__(self, fail_after_files: int | None = None):
        self.fail_after_files = fail_after_files
        self.loaded = []

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # DeepSpeed must not write `latest` itself
        tag_dir = Path(save_dir) / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(FILES):
            if self.fail_after_files is not None and i >= self.fail_after_files:
                raise RuntimeError("killed mid-save")
            (tag_dir / name).write_text(str(client_state))

    def load_checkpoint(self, load_dir, tag, **kw):
        self.loaded.append(tag)
        return str(Path(load_dir) / tag), ast.literal_eval((Path(load_dir) / tag / FILES[0]).read_text())


def _dirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir())


def _save_steps(path, steps, keep=10):
    for step in steps:
        checkpoint.save(FakeEngine(), path, step, {"step": step}, keep=keep)


def test_latest_moves_only_after_a_complete_save_and_old_tags_are_pruned(tmp_path):
    for step in (2, 4, 6):
        checkpoint.save(FakeEngine(), tmp_path, step, {"step": step}, keep=2)
        assert checkpoint.latest_tag(tmp_path) == checkpoint.tag_for(step)
    assert _dirs(tmp_path) == ["step00000004", "step00000006"]

    with pytest.raises(RuntimeError, match="mid-save"):
        checkpoint.save(FakeEngine(fail_after_files=1), tmp_path, 8, {"step": 8}, keep=2)
    assert checkpoint.latest_tag(tmp_path) == "step00000006"  # still the complete one
    assert checkpoint.resume_tag(tmp_path) == "step00000006"  # the partial step 8 has no marker
    assert (tmp_path / "step00000006").is_dir() and (tmp_path / "step00000004").is_dir()
    assert not (tmp_path / "latest.tmp").exists()

    # the resumed run saves step 8 again over the partial leftovers
    checkpoint.save(FakeEngine(), tmp_path, 8, {"step": 8}, keep=2)
    assert checkpoint.latest_tag(tmp_path) == "step00000008"
    assert _dirs(tmp_path) == ["step00000006", "step00000008"]


def test_latest_naming_a_missing_tag_is_no_checkpoint(tmp_path):
    (tmp_path / "latest").write_text("step00000010")
    assert checkpoint.latest_tag(tmp_path) is None
    assert checkpoint.latest_tag(tmp_path / "nothing") is None


def test_lost_latest_resumes_from_the_newest_complete_checkpoint(tmp_path, caplog):
    """Probe: `latest` deleted with steps 10, 15, 20 on disk restarted at 0 and the first save
    deleted all three. Now the markers find step 20, and nothing is deleted."""
    _save_steps(tmp_path, (10, 15, 20))
    (tmp_path / "latest").unlink()
    engine = FakeEngine()
    with caplog.at_level(logging.WARNING, logger="pipeline.train.checkpoint"):
        tag, client = checkpoint.load(engine, tmp_path)
    assert (tag, client) == ("step00000020", {"step": 20})
    assert "'latest' is missing" in caplog.text
    (tmp_path / "latest").write_text("step00000015")  # an older pointer changes nothing either
    assert checkpoint.load(FakeEngine(), tmp_path)[0] == "step00000020"
    (tmp_path / "latest").write_text("step00000099")  # nor one naming no tag
    assert checkpoint.load(FakeEngine(), tmp_path)[0] == "step00000020"
    assert _dirs(tmp_path) == ["step00000010", "step00000015", "step00000020"]


def test_a_save_never_prunes_a_newer_complete_checkpoint(tmp_path):
    """A run that started over (step 0) while complete steps 10-20 exist: its first save refuses,
    naming them, instead of deleting them as "newer leftovers"."""
    _save_steps(tmp_path, (10, 15, 20))
    with pytest.raises(checkpoint.CheckpointError, match=r"newer than it .*step00000020.* Move them away"):
        checkpoint.save(FakeEngine(), tmp_path, 2, {"step": 2}, keep=2)
    assert _dirs(tmp_path) == ["step00000010", "step00000015", "step00000020"]
    assert not (tmp_path / "step00000002").exists()
    # a newer tag without a marker is an unfinished save: cleaned
    (tmp_path / "step00000030").mkdir()
    (tmp_path / "step00000030" / FILES[0]).write_text("partial")
    checkpoint.save(FakeEngine(), tmp_path, 25, {"step": 25}, keep=2)
    assert _dirs(tmp_path) == ["step00000020", "step00000025"]


def test_a_truncated_file_is_named_and_its_checkpoint_skipped(tmp_path, caplog):
    """Probe: a truncated file in the newest tag (10 and 15 intact) gave `OSError: [Errno 22]`
    naming no file. Now the file is named, the tag kept aside and step 15 resumed."""
    _save_steps(tmp_path, (10, 15, 20))
    victim = tmp_path / "step00000020" / FILES[1]
    os.truncate(victim, 3)
    with caplog.at_level(logging.WARNING, logger="pipeline.train.checkpoint"):
        tag, client = checkpoint.load(FakeEngine(), tmp_path)
    assert (tag, client) == ("step00000015", {"step": 15})
    assert str(victim) in caplog.text and "3 bytes" in caplog.text
    assert _dirs(tmp_path) == ["step00000010", "step00000015", "step00000020.broken"]  # kept, not deleted
    assert checkpoint.resume_tag(tmp_path) == "step00000015"


def test_a_checkpoint_that_fails_to_load_falls_back_in_one_process(tmp_path, caplog):
    _save_steps(tmp_path, (10, 15))

    class Failing(FakeEngine):
        def load_checkpoint(self, load_dir, tag, **kw):
            if tag == "step00000015":
                raise OSError(22, "Invalid argument")
            return super().load_checkpoint(load_dir, tag, **kw)

    with caplog.at_level(logging.WARNING, logger="pipeline.train.checkpoint"):
        assert checkpoint.load(Failing(), tmp_path)[0] == "step00000010"
    assert "step00000015 failed to load" in caplog.text
    assert (tmp_path / "step00000015.broken").is_dir()
    _save_steps(tmp_path, (15,))
    with pytest.raises(checkpoint.CheckpointError, match="step00000015 failed to load"):
        checkpoint.load(Failing(), tmp_path, world_size=2)  # collective loads: no rank skips alone


DATA = {"seed": 0, "shards": ["s/a.tar", "s/b.tar"]}


def _record(world_size=2, zero_stage=3, hidden=8, freeze_first=False, micro_batch=4, data=None):
    from pipeline.train import ckpt_record

    module = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Linear(hidden, 2))
    module[0].requires_grad_(not freeze_first)
    data = DATA if data is None else {**DATA, **data}
    return ckpt_record.record(module, world_size, zero_stage, global_batch=micro_batch * world_size, data=data)


@pytest.mark.parametrize(
    "now,named",
    [
        (dict(world_size=1), "global batch 8 when saved, 4 now"),
        (dict(world_size=1, zero_stage=0), "world size 2 when saved, 1 now (another world size is resumed under"),
        (dict(zero_stage=0), "ZeRO stage 3 when saved, 0 now"),
        (dict(hidden=16), "3 parameter shapes differ (saved -> now): 0.weight [8, 4] -> [16, 4]"),
        (dict(freeze_first=True), "frozen parameters differ: none trainable now, 0.bias, 0.weight frozen now"),
        # the data stream the saved position is a place in (torchtune warns on such changes)
        (dict(data={"seed": 1}), "data.seed 0 when saved, 1 now"),
        (dict(data={"shards": ["s/a.tar"]}), "data.shards differ (2 shards when saved, 1 now): s/b.tar only then"),
    ],
)
def test_a_checkpoint_saved_with_another_configuration_is_refused_and_kept(tmp_path, now, named):
    """Probe: 2-rank ZeRO-3 checkpoints rerun on 1 process failed to load, every one was renamed
    *.broken, and the rerun on 2 ranks started from step 0. A configuration mismatch is now named
    before anything is loaded, nothing is renamed (not even a torn newer tag), and the original
    configuration resumes from the newest complete tag."""
    for step in (2, 4, 6):
        checkpoint.save(FakeEngine(), tmp_path, step, {"step": step}, keep=10, record=_record())
    (tmp_path / "step00000008").mkdir()  # a torn save: no marker
    (tmp_path / "step00000008" / FILES[0]).write_text("partial")
    before = _dirs(tmp_path)
    engine = FakeEngine()
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"step00000006 was saved with another") as e:
        checkpoint.load(engine, tmp_path, world_size=now.get("world_size", 2), record=_record(**now))
    assert named in str(e.value) and "nothing was renamed" in str(e.value)
    assert engine.loaded == [] and _dirs(tmp_path) == before
    assert checkpoint.load(FakeEngine(), tmp_path, world_size=2, record=_record()) == ("step00000006", {"step": 6})


def test_a_mismatch_is_named_before_a_broken_newer_tag_is_set_aside(tmp_path):
    for step in (2, 4):
        checkpoint.save(FakeEngine(), tmp_path, step, {"step": step}, keep=10, record=_record())
    os.truncate(tmp_path / "step00000004" / FILES[1], 1)
    with pytest.raises(checkpoint.CheckpointMismatch, match=r"step00000002 .* global batch 8 when saved, 4 now"):
        checkpoint.load(FakeEngine(), tmp_path, world_size=1, record=_record(world_size=1))
    assert _dirs(tmp_path) == ["step00000002", "step00000004"]
    # the torn tag is still set aside when the configuration matches
    assert checkpoint.load(FakeEngine(), tmp_path, world_size=2, record=_record())[0] == "step00000002"
    assert _dirs(tmp_path) == ["step00000002", "step00000004.broken"]


def test_markers_without_a_record_are_checked_by_deepspeeds_file_names(tmp_path):
    """Tags marked before markers held `saved_with`: DeepSpeed's per-rank ZeRO-3 files give the
    world size and the stage; the shapes are not known and not compared."""
    tag = tmp_path / "step00000006"
    tag.mkdir()
    for r in (0, 1):
        for kind in ("model", "optim"):
            (tag / f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt").write_text("x")
    checkpoint._mark_complete(tag)
    (tmp_path / "FORMAT").write_text("")
    with pytest.raises(checkpoint.CheckpointMismatch, match="world size 2 when saved, 1 now, and the checkpoint"):
        checkpoint.check_resumable(tmp_path, _record(world_size=1))  # its global batch is not known
    assert checkpoint.check_resumable(tmp_path, _record(world_size=1), allow_batch_change=True)  # reshaped
    with pytest.raises(checkpoint.CheckpointMismatch, match="ZeRO stage 3 when saved, 2 now"):
        checkpoint.check_resumable(tmp_path, _record(zero_stage=2))
    checkpoint.check_resumable(tmp_path, _record(hidden=16))  # shapes unknown: left to the load
    # ZeRO-1/2 (and ZeRO-0 bf16): one model file, one optimizer file per data-parallel rank
    for p in [*tag.iterdir()]:
        p.unlink()
    for name in ("mp_rank_00_model_states.pt", *(f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1))):
        (tag / name).write_text("x")
    checkpoint._mark_complete(tag)
    with pytest.raises(checkpoint.CheckpointMismatch, match="ZeRO stage 0 or 1 or 2 when saved, 3 now"):
        checkpoint.check_resumable(tmp_path, _record())
    checkpoint.check_resumable(tmp_path, _record(zero_stage=2))


def test_checkpoints_from_before_the_markers(tmp_path):
    """Tags without markers and no FORMAT: resumed from the one `latest` names (and marked
    then); without a usable `latest`, refused rather than guessed or deleted."""
    for step in (10, 15):
        checkpoint.save(FakeEngine(), tmp_path, step, {"step": step}, keep=10)
    for p in [tmp_path / "FORMAT", *tmp_path.glob("step*/COMPLETE")]:
        p.unlink()
    (tmp_path / "latest").unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"without completion markers .* step00000015"):
        checkpoint.load(FakeEngine(), tmp_path)
    (tmp_path / "latest").write_text("step00000015")
    assert checkpoint.load(FakeEngine(), tmp_path)[0] == "step00000015"
    assert checkpoint.is_complete(tmp_path / "step00000015")
    assert not checkpoint.is_complete(tmp_path / "step00000010")


class Payload:
    """Pickled code: touching a file when unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_checkpoint_loads_run_no_pickled_code(tmp_path):
    """Probe: checkpoint.py loaded with weights_only=False, so a checkpoint from elsewhere ran
    pickle code. DeepSpeed's own loader (TorchCheckpointEngine, weights_only=False) and the
    ZeRO-0 consolidation now both load weights only."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    touched = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    tag = ckpt / "step00000005"
    tag.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}, "x": Payload(touched)}, tag / "mp_rank_00_model_states.pt")
    checkpoint._mark_complete(tag)
    (ckpt / "latest").write_text(tag.name)

    class DeepSpeedLoads(FakeEngine):
        def load_checkpoint(self, load_dir, tag, **kw):
            path = Path(load_dir) / tag / "mp_rank_00_model_states.pt"
            return str(path), TorchCheckpointEngine().load(str(path))

    with pytest.raises(checkpoint.CheckpointError, match="every checkpoint is broken"):
        checkpoint.load(DeepSpeedLoads(), ckpt)
    assert not touched.exists()
    (ckpt / "step00000005.broken").rename(tag)
    with pytest.raises(Exception, match="Unsupported global"):
        checkpoint.consolidated_state_dict(ckpt)
    assert not touched.exists()
    # what this project's checkpoints hold still loads: the client state's numpy RNG state
    import numpy as np

    torch.save({"module": {"w": torch.ones(2)}, "rng": np.random.get_state()}, tag / "mp_rank_00_model_states.pt")
    checkpoint._mark_complete(tag)
    assert torch.equal(checkpoint.consolidated_state_dict(ckpt)["w"], torch.ones(2))
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # only inside the loads


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    """Probe: a crash mid-write left half a line in metrics.jsonl and every resume failed
    with JSONDecodeError. Now it is dropped with a warning and the run appends after it."""
    from pipeline.train.monitor import Monitor, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss/total": 2.0}\n{"step": 2, "loss/total": 1.5}\n{"step": 3, "loss/to')
    with caplog.at_level(logging.WARNING, logger="pipeline.train.monitor"):
        monitor = Monitor(active=True, tb_dir=tmp_path / "tb", metrics_path=path, start_step=2, total_steps=4)
    assert "line 3 is not a whole record" in caplog.text
    monitor.step(3, {"loss/total": 1.0}, record={"loss/total": 1.0})
    monitor.close()
    assert sorted(read_metrics(path)) == [1, 2, 3]
    assert read_metrics(path)[3]["loss/total"] == 1.0


class DiskFills(FakeEngine):
    """Writes the first file, then fails as the disk fills: torch's own error or an OSError."""

    def __init__(self, error):
        super().__init__(fail_after_files=1)
        self.error = error

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        try:
            super().save_checkpoint(save_dir, tag, client_state, save_latest)
        except RuntimeError:
            raise self.error from None


@pytest.mark.parametrize(
    "error", [RuntimeError("basic_ios::clear: iostream error"), OSError(28, "No space left on device")]
)
def test_a_full_disk_during_a_save_is_named(tmp_path, monkeypatch, error):
    """Probe: a disk that filled during a save ended the run with torch's bare "basic_ios::clear:
    iostream error". Now the tag, the bytes needed (the previous tag's size) and free are named;
    the previous tag stays the resume point."""
    _save_steps(tmp_path, (2,))
    needed = sum(p.stat().st_size for p in (tmp_path / "step00000002").iterdir())
    monkeypatch.setattr(checkpoint, "_free_bytes", lambda path: 1234)
    with pytest.raises(checkpoint.CheckpointDiskFull) as e:
        checkpoint.save(DiskFills(error), tmp_path, 4, {"step": 4})
    msg = str(e.value)
    assert f"no space left for checkpoint {tmp_path / 'step00000004'}" in msg
    assert f"1,234 bytes free on its filesystem, about {needed:,} bytes needed (the size of step00000002)" in msg
    assert str(error) in msg and "step00000002 stays the resume point" in msg
    assert checkpoint.resume_tag(tmp_path) == "step00000002" and checkpoint.latest_tag(tmp_path) == "step00000002"


def test_a_first_save_estimates_its_size_and_other_errors_pass_unchanged(tmp_path, monkeypatch):
    rec = _record()
    monkeypatch.setattr(checkpoint, "_free_bytes", lambda path: 0)
    torch_error = RuntimeError("basic_ios::clear: iostream error")
    # no earlier tag: 16 bytes per trainable parameter (weights, fp32 master, two Adam moments), 58 of them
    with pytest.raises(checkpoint.CheckpointDiskFull, match=r"about 928 bytes needed \(estimated from the model"):
        checkpoint.save(DiskFills(torch_error), tmp_path, 2, {"step": 2}, record=rec)
    # the same error with the disk far from full is not a full disk: raised as it was
    monkeypatch.setattr(checkpoint, "_free_bytes", lambda path: 10 * 2**30)
    with pytest.raises(RuntimeError, match="basic_ios") as e:
        checkpoint.save(DiskFills(torch_error), tmp_path, 2, {"step": 2}, record=rec)
    assert type(e.value) is RuntimeError


def test_another_world_size_is_reshaped_only_under_zero3_and_the_same_global_batch(tmp_path):
    """2 ranks x 4 = 8: resumable on 1 x 8 or 4 x 2 (reshaped, through the universal checkpoint),
    not on 1 x 4 unless allowed, not below ZeRO-3, never loaded directly."""
    checkpoint.save(FakeEngine(), tmp_path, 2, {"step": 2}, record=_record())
    assert checkpoint.check_resumable(tmp_path, _record()) is False
    assert checkpoint.check_resumable(tmp_path, _record(world_size=1, micro_batch=8)) is True
    assert checkpoint.check_resumable(tmp_path, _record(world_size=4, micro_batch=2)) is True
    assert checkpoint.check_resumable(tmp_path, _record(world_size=1), allow_batch_change=True) is True
    with pytest.raises(checkpoint.CheckpointMismatch, match="global batch 8 when saved, 16 now"):
        checkpoint.check_resumable(tmp_path, _record(world_size=4))
    plan = checkpoint.resume_plan(tmp_path, _record(world_size=4, micro_batch=2))
    assert (plan.tag, plan.reshaped, plan.saved_with["world_size"]) == ("step00000002", True, 2)
    with pytest.raises(checkpoint.CheckpointMismatch, match="loads through its universal conversion"):
        checkpoint.load(FakeEngine(), tmp_path, world_size=1, record=_record(world_size=1, micro_batch=8))
    assert _dirs(tmp_path) == ["step00000002"]


def test_a_changed_architecture_is_named():
    from pipeline.train import ckpt_record

    saved, now = _record(), _record()
    saved["architecture"] = {"atp_layers": [1, 3], "text.num_attention_heads": 4}
    now["architecture"] = {"atp_layers": [1, 5], "text.num_attention_heads": 4}
    assert ckpt_record.differences(saved, now) == [
        "model architecture differs (saved -> now): atp_layers [1, 3] -> [1, 5]"
    ]
    del saved["architecture"]  # markers from before the record: not compared
    assert ckpt_record.differences(saved, now) == []
