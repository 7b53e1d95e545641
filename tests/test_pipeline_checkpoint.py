"""`latest` only ever names a complete checkpoint (pipeline.checkpoint), without DeepSpeed:
a stand-in engine writes a tag's files the way `save_checkpoint` does, or dies half-way."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import checkpoint


class FakeEngine:
    def __init__(self, fail_after_files: int | None = None):
        self.fail_after_files = fail_after_files

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # DeepSpeed must not write `latest` itself
        tag_dir = Path(save_dir) / tag
        tag_dir.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(
            ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
        ):
            if self.fail_after_files is not None and i >= self.fail_after_files:
                raise RuntimeError("killed mid-save")
            (tag_dir / name).write_text(str(client_state))


def test_latest_moves_only_after_a_complete_save_and_old_tags_are_pruned(tmp_path):
    for step in (2, 4, 6):
        checkpoint.save(FakeEngine(), tmp_path, step, {"step": step}, keep=2)
        assert checkpoint.latest_tag(tmp_path) == checkpoint.tag_for(step)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step00000004", "step00000006"]

    with pytest.raises(RuntimeError, match="mid-save"):
        checkpoint.save(FakeEngine(fail_after_files=1), tmp_path, 8, {"step": 8}, keep=2)
    assert checkpoint.latest_tag(tmp_path) == "step00000006"  # still the complete one
    assert (tmp_path / "step00000006").is_dir() and (tmp_path / "step00000004").is_dir()
    assert not (tmp_path / "latest.tmp").exists()

    # the resumed run saves step 8 again over the partial leftovers
    checkpoint.save(FakeEngine(), tmp_path, 8, {"step": 8}, keep=2)
    assert checkpoint.latest_tag(tmp_path) == "step00000008"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step00000006", "step00000008"]


def test_latest_naming_a_missing_tag_is_no_checkpoint(tmp_path):
    (tmp_path / "latest").write_text("step00000010")
    assert checkpoint.latest_tag(tmp_path) is None
    assert checkpoint.latest_tag(tmp_path / "nothing") is None
