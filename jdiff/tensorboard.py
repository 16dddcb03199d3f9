"""A TensorBoard log of training (loss, style_loss, prior_loss, lr per step), written without TensorBoard.

TensorBoard reads event files: TFRecord files (each record: its length, a masked CRC-32C of the length, the
data, a masked CRC-32C of the data) whose records are ``Event`` protocol buffers. Training writes one only when
``tensorboard`` is installed (nobody could read it otherwise), but the format is written and read here, so jdiff
needs neither TensorBoard nor protobuf. The whole file is rewritten from the loss rows each time the loss log is
(an atomic rename, like every run file), so a resumed run's log holds each step once.
"""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

from jdiff.files import atomic_write

EVENTS = "events.out.tfevents.jdiff"  # TensorBoard reads every file whose name holds "tfevents"
TAGS = ("loss", "style_loss", "prior_loss", "lr")


def available() -> bool:
    """Whether TensorBoard is installed, so that a log is worth writing."""
    return importlib.util.find_spec("tensorboard") is not None


# -- CRC-32C (Castagnoli), as TFRecord uses it --------------------------------------------------------------

def _table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc(header)) + data + struct.pack("<I", masked_crc(data))


# -- the Event message: wall_time (1, double), step (2, int64), file_version (3, string), summary (5) -----------
# Summary: value (1, repeated Value); Value: tag (1, string), simple_value (2, float)

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event(wall_time: float, step: int = 0, *, file_version: str = "", scalars: dict[str, float] | None = None) -> bytes:
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(int(step))
    if file_version:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", v))
                          for tag, v in scalars.items())
        out += _bytes_field(5, values)
    return out


def write_log(folder: Path, rows: list[dict], start_time: float) -> Path:
    """The event file of loss rows (:data:`jdiff.train.LOSS_COLUMNS`), each at ``start_time`` + its seconds."""
    records = [tfrecord(event(start_time, file_version="brain.Event:2"))]
    records += [tfrecord(event(start_time + float(r["seconds"]), r["step"],
                               scalars={tag: float(r[tag]) for tag in TAGS})) for r in rows]
    data = b"".join(records)
    return atomic_write(Path(folder) / EVENTS, lambda tmp: tmp.write_bytes(data))


# -- reading back (tests; TensorBoard's own reader is EventAccumulator) -------------------------------------------

def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _fields(data: bytes):
    """(field number, wire type, value) of a protocol buffer message."""
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(data, i)
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        elif wire == 2:
            size, i = _read_varint(data, i)
            value, i = data[i:i + size], i + size
        else:
            raise ValueError(f"wire type {wire} is not used by Event messages")
        yield number, wire, value


def read_log(path: Path) -> list[dict]:
    """The events of an event file as dicts (wall_time, step, file_version, scalars); checks every CRC."""
    data, events, i = Path(path).read_bytes(), [], 0
    while i < len(data):
        header = data[i:i + 8]
        (size,) = struct.unpack("<Q", header)
        (crc,) = struct.unpack("<I", data[i + 8:i + 12])
        body = data[i + 12:i + 12 + size]
        (body_crc,) = struct.unpack("<I", data[i + 12 + size:i + 16 + size])
        if crc != masked_crc(header) or body_crc != masked_crc(body):
            raise ValueError(f"{path}: record at byte {i} fails its CRC")
        i += 16 + size
        found = {"wall_time": None, "step": 0, "file_version": "", "scalars": {}}
        for number, _, value in _fields(body):
            if number == 1:
                found["wall_time"] = struct.unpack("<d", value)[0]
            elif number == 2:
                found["step"] = value
            elif number == 3:
                found["file_version"] = value.decode()
            elif number == 5:
                for _, _, item in _fields(value):
                    parts = {n: v for n, _, v in _fields(item)}
                    found["scalars"][parts[1].decode()] = struct.unpack("<f", parts[2])[0]
        events.append(found)
    return events
