"""The weight files a release record vouches for, found and hashed without loading the model."""

from __future__ import annotations

from lmforge.store.checkpoint import latest_checkpoint
from lmforge.store.hashes import sha256_file
from lmforge.store.weights import weight_file_hashes, weight_files


def test_a_run_dir_means_its_latest_checkpoints_dcp_files_not_its_trainer_state(trained_run):
    files = weight_files(trained_run)
    assert {f.parent for f in files} == {latest_checkpoint(trained_run / "checkpoints")}
    names = [f.name for f in files]
    assert names[0] == ".metadata" and names[1:] and all(n.endswith(".distcp") for n in names[1:])
    assert weight_file_hashes(trained_run) == {f.name: sha256_file(f) for f in files}
