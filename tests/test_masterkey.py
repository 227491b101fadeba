"""The master key and its keyring (server/runtime/masterkey.py): sealing, the key file, rotation."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.runtime.errors import ConfigError, StorageError
from server.runtime.masterkey import Keyring, default_path, encode_key, new_key


def test_a_sealed_value_opens_with_its_associated_data_only():
    ring = Keyring([new_key()])
    sealed = ring.seal(b"-----BEGIN PRIVATE KEY-----", b"apps:com.acme.app")
    assert b"PRIVATE" not in sealed
    assert ring.open(sealed, b"apps:com.acme.app") == b"-----BEGIN PRIVATE KEY-----"
    with pytest.raises(StorageError, match="moved to another record"):
        ring.open(sealed, b"apps:com.other.app")
    assert ring.seal(b"x", b"k") != ring.seal(b"x", b"k")  # a nonce each time


def test_another_master_key_does_not_open_it_and_says_why():
    sealed = Keyring([new_key()]).seal(b"secret", b"k")
    with pytest.raises(StorageError, match="master key this server does not have"):
        Keyring([new_key()]).open(sealed, b"k")


def test_a_ring_with_the_old_key_opens_old_values_and_seals_with_the_new_one():
    old, new = new_key(), new_key()
    sealed_old = Keyring([old]).seal(b"secret", b"k")
    ring = Keyring([new, old])
    assert ring.open(sealed_old, b"k") == b"secret"
    assert not ring.is_current(sealed_old)
    assert ring.is_current(ring.seal(b"secret", b"k"))
    assert Keyring([new]).open(ring.seal(b"secret", b"k"), b"k") == b"secret"


def test_the_first_start_creates_the_key_file_beside_the_data_folder_private(tmp_path):
    path = default_path(tmp_path / "pigeon-data")
    assert path == tmp_path / "pigeon-data.master-key"
    ring = Keyring.load(path, env={})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Keyring.load(path, env={})
    assert again.open(ring.seal(b"x", b"k"), b"k") == b"x"


def test_the_environment_wins_in_base64url_or_hex(tmp_path):
    key = new_key()
    for text in (encode_key(key), key.hex()):
        ring = Keyring.load(tmp_path / "absent", env={"PIGEON_MASTER_KEY": text})
        assert ring.path is None and ring.keys == [key]
    assert not (tmp_path / "absent").exists()


def test_a_wrong_key_file_is_a_configuration_error_naming_it(tmp_path):
    path = tmp_path / "k"
    for text in ("", "# only a comment\n", "short\n", "zz" * 32 + "\n"):
        path.write_text(text)
        with pytest.raises(ConfigError, match=str(path)):
            Keyring.load(path, env={})
    path.write_bytes(b"\xff\xfe" * 20)
    with pytest.raises(ConfigError, match=str(path)):
        Keyring.load(path, env={})
    with pytest.raises(ConfigError, match="PIGEON_MASTER_KEY"):
        Keyring.load(path, env={"PIGEON_MASTER_KEY": "nope"})


def test_a_key_file_readable_by_others_is_tightened(tmp_path):
    path = tmp_path / "k"
    path.write_text(encode_key(new_key()) + "\n")
    path.chmod(0o644)
    Keyring.load(path, env={})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=40))
def test_any_bytes_either_open_or_fail_with_a_storage_error(data, aad):
    ring = Keyring([new_key()])
    with pytest.raises(StorageError):
        ring.open(data, aad)
    sealed = ring.seal(data, aad)
    assert ring.open(sealed, aad) == data


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_key_file_text_gives_a_keyring_or_a_configuration_error(tmp_path_factory, text):
    path: Path = tmp_path_factory.mktemp("k") / "master-key"
    path.write_text(text)
    try:
        ring = Keyring.load(path, env={})
    except ConfigError:
        return
    assert all(len(key) == 32 for key in ring.keys)


async def test_the_store_reads_or_makes_the_master_key_when_it_opens(tmp_path):
    import trio

    from server.profiles.store import ProfileStore

    store = ProfileStore(tmp_path / "data", clock=lambda: 1)
    assert not (tmp_path / "data.master-key").exists()  # nothing is made before the store opens
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        assert store.keyring is not None
        assert stat.S_IMODE((tmp_path / "data.master-key").stat().st_mode) == 0o600
        store.request_stop()
    assert not list((tmp_path / "data").glob("*master-key*"))  # beside the data folder, not inside


def test_private_files_are_written_through_a_fresh_temporary_file_never_a_planted_one(tmp_path):
    """The attack review: the admin key file was written through `.<name>.<pid>`, opened
    without O_EXCL: a planted link there sent the key where it pointed, a planted 0644 file
    kept its mode. The master key file's `.tmp` had the same flaw."""
    import os

    from server.access.keys import write_admin_key

    target = tmp_path / "data.admin-key"
    stolen = tmp_path / "stolen.txt"
    for name in (f".{target.name}.{os.getpid()}", f"{target.name}.tmp"):
        (tmp_path / name).symlink_to(stolen)
    loose = tmp_path / f".{target.name}.{os.getpid() + 1}"
    loose.write_text("")
    loose.chmod(0o644)
    write_admin_key(target, "pgn_" + "k" * 43)
    assert not stolen.exists()
    assert not target.is_symlink() and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert target.read_text() == "pgn_" + "k" * 43 + "\n"
    ring = Keyring([new_key()], tmp_path / "master-key")
    (tmp_path / "master-key.tmp").symlink_to(stolen) if not (tmp_path / "master-key.tmp").exists() else None
    ring.save()
    assert not stolen.exists() and stat.S_IMODE((tmp_path / "master-key").stat().st_mode) == 0o600


def test_a_master_key_file_that_is_a_link_is_read_but_not_changed(tmp_path):
    from server.runtime.errors import FailedPrecondition

    mounted = tmp_path / "mount" / "key"
    mounted.parent.mkdir()
    mounted.write_text(encode_key(new_key()) + "\n")
    mounted.chmod(0o640)
    link = tmp_path / "data.master-key"
    link.symlink_to(mounted)
    ring = Keyring.load(link, env={})
    assert stat.S_IMODE(mounted.stat().st_mode) == 0o640  # not ours to change
    with pytest.raises(FailedPrecondition, match="is a link"):
        Keyring([new_key(), *ring.keys], link).save()
    assert link.is_symlink()
