"""DirectReader on real files: exact bytes of unaligned ranges, file tails, short reads, fallback, parallel reads."""

import ctypes
import errno
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tiermoe.offload.tiers import direct_io
from tiermoe.offload.tiers.direct_io import PAGE, BufferPool, DirectReader, ShortReadError, drop_page_cache

SIZE = 5 * PAGE + 1234  # the tail is not a whole page
DATA = os.urandom(SIZE)


def disk_backed_dir() -> Path:
    """A directory on a real disk: /tmp may be tmpfs, which (on older kernels) refuses O_DIRECT."""
    for base in (Path(__file__).resolve().parents[2] / "runs", Path("/var/tmp")):
        try:
            base.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix="direct_io_test_", dir=base))
        except OSError:
            continue
    pytest.skip("no writable disk-backed directory")


@pytest.fixture(scope="module")
def data_file():
    folder = disk_backed_dir()
    path = folder / "data.bin"
    path.write_bytes(DATA)
    yield path
    shutil.rmtree(folder)


@pytest.fixture(scope="module")
def direct_reader(data_file):
    with DirectReader(max_workers=3) as reader:
        if not reader.is_direct(data_file):
            pytest.skip(f"{data_file.parent} refuses O_DIRECT: {reader.fallbacks}")
        yield reader


@pytest.fixture(scope="module")
def buffered_reader():
    with DirectReader(direct=False) as reader:
        yield reader


ranges = st.integers(0, SIZE).flatmap(lambda off: st.tuples(st.just(off), st.integers(0, SIZE - off)))


@settings(max_examples=200, deadline=None)
@given(r=ranges)
def test_direct_read_returns_exactly_the_requested_bytes(direct_reader, data_file, r):
    offset, nbytes = r
    with direct_reader.read(data_file, offset, nbytes) as seg:
        assert seg.nbytes == nbytes and len(seg.view) == nbytes
        assert bytes(seg.view) == DATA[offset:offset + nbytes]


@settings(max_examples=50, deadline=None)
@given(r=ranges)
def test_buffered_read_returns_exactly_the_requested_bytes(buffered_reader, data_file, r):
    offset, nbytes = r
    with buffered_reader.read(data_file, offset, nbytes) as seg:
        assert bytes(seg.view) == DATA[offset:offset + nbytes]


def test_tail_of_a_file_that_is_not_page_sized(direct_reader, data_file):
    with direct_reader.read(data_file, SIZE - 1300, 1300) as seg:
        assert bytes(seg.view) == DATA[-1300:]
    with direct_reader.read(data_file, 0, SIZE) as seg:
        assert bytes(seg.view) == DATA


def test_reading_past_the_end_raises_a_short_read_naming_file_and_range(direct_reader, data_file):
    with pytest.raises(ShortReadError, match=rf"{data_file}.*\[{SIZE - 10}, {SIZE + 10}\)") as info:
        direct_reader.read(data_file, SIZE - 10, 20)
    assert isinstance(info.value, OSError) and info.value.got == 10
    with pytest.raises(ShortReadError, match="got 0"):
        direct_reader.read(data_file, SIZE + 5000, 8)


def test_file_truncated_after_open(tmp_path):
    path = tmp_path / "shrinks.bin"
    path.write_bytes(DATA)
    with DirectReader() as reader:
        assert bytes(reader.read(path, 100, 200).view) == DATA[100:300]
        os.truncate(path, 3 * PAGE)  # a checkpoint cut short under our feet
        with pytest.raises(ShortReadError, match=r"shrinks.bin: wanted bytes \[12000, 13000\)"):
            reader.read(path, 12000, 1000)


def test_falls_back_to_buffered_reads_when_open_refuses_o_direct(data_file, monkeypatch):
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_io.os, "open", refusing_open)
    with DirectReader() as reader:
        assert bytes(reader.read(data_file, 4097, 5000).view) == DATA[4097:9097]
        assert not reader.is_direct(data_file)
        assert "O_DIRECT" in reader.fallbacks[str(data_file)]


def test_falls_back_when_o_direct_reads_fail(data_file, monkeypatch):
    real_preadv = os.preadv
    calls = []

    def preadv_refusing_first(fd, buffers, offset):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    with DirectReader() as reader:
        if not reader.is_direct(data_file):
            pytest.skip("O_DIRECT unavailable here")
        monkeypatch.setattr(direct_io.os, "preadv", preadv_refusing_first)
        assert bytes(reader.read(data_file, 10, 100).view) == DATA[10:110]
        assert not reader.is_direct(data_file) and "EINVAL on read" in reader.fallbacks[str(data_file)]


def test_read_many_keeps_order_and_bytes(direct_reader, data_file):
    ranges = [(data_file, off, n) for off, n in [(0, 1), (4095, 2), (SIZE - 7, 7), (1000, 9000), (8192, 4096)] * 8]
    segments = direct_reader.read_many(ranges)
    assert [bytes(s.view) for s in segments] == [DATA[off:off + n] for _, off, n in ranges]
    for s in segments:
        s.release()


def test_read_many_raises_the_short_read_and_returns_buffers(data_file):
    with DirectReader(max_workers=2) as reader:
        with pytest.raises(ShortReadError):
            reader.read_many([(data_file, 0, 10), (data_file, SIZE - 1, 2), (data_file, 20, 10)])
        assert reader.pool.in_use == 0 and reader.pool.idle_bytes >= PAGE  # every buffer went back to the pool


def test_buffers_are_reused_after_release(data_file):
    with DirectReader() as reader:
        first = reader.read(data_file, 100, 5000)
        buffer = first.buffer
        first.release()
        second = reader.read(data_file, 4196, 5000)  # also spans 2 pages
        assert second.buffer is buffer and bytes(second.view) == DATA[4196:9196]


def test_an_arena_maps_its_buffers_once_and_keeps_them_whatever_the_idle_cap(data_file):
    pool = BufferPool(max_bytes=0)  # keeps no buffer of its own idle
    pool.reserve(5000, 3)  # 3 buffers of 2 pages
    assert pool.arena_bytes == pool.live_bytes == pool.peak_bytes == 3 * 2 * PAGE
    with DirectReader(pool=pool) as reader:
        segments = [reader.read(data_file, 4096 * i + 7, 5000) for i in range(3)]  # each spans 2 pages
        addresses = [ctypes.addressof(ctypes.c_char.from_buffer(s.buffer)) for s in segments]
        assert all(a % PAGE == 0 for a in addresses) and len({a // (2 * PAGE) for a in addresses}) == 3
        assert [bytes(s.view) for s in segments] == [DATA[4096 * i + 7:4096 * i + 5007] for i in range(3)]
        assert pool.live_bytes == pool.arena_bytes  # nothing mapped beyond the arena
        extra = reader.read(data_file, 0, 5000)  # the arena is all in use: a buffer of its own
        assert pool.live_bytes == pool.arena_bytes + 2 * PAGE
        extra.release()  # not kept (max_bytes 0)
        for s in segments:
            s.release()
        assert pool.live_bytes == pool.arena_bytes and pool.idle_bytes == 0 and pool.in_use == 0
        again = reader.read(data_file, 100, 5000)
        assert ctypes.addressof(ctypes.c_char.from_buffer(again.buffer)) in addresses  # reused, not mapped
        assert bytes(again.view) == DATA[100:5100] and pool.peak_bytes == pool.arena_bytes + 2 * PAGE
        again.release()


def test_as_tensor_views_the_buffer_without_copy(direct_reader, data_file):
    torch = pytest.importorskip("torch")
    offset, shape = 4096 + 6, (3, 50)  # unaligned start, 300 bytes of bf16
    seg = direct_reader.read(data_file, offset, 300)
    t = seg.as_tensor(torch.bfloat16, shape)
    expected = torch.frombuffer(bytearray(DATA[offset:offset + 300]), dtype=torch.bfloat16).view(shape)
    assert t.shape == shape and torch.equal(t.view(torch.int16), expected.view(torch.int16))
    seg.view[0:2] = b"\x00\x00"  # writes through the view show in the tensor: same memory
    assert t.view(torch.int16)[0, 0].item() == 0


def test_drop_page_cache_runs(data_file):
    drop_page_cache(data_file)
    with DirectReader(direct=False) as reader:
        assert bytes(reader.read(data_file, 0, 64).view) == DATA[:64]
