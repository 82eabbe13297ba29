"""Read the history of an offline W&B run from its `.wandb` file (a LevelDB-style log of
protobuf records), so tests can check what a run logged without a server."""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

HEADER = 7  # ":W&B" + 2-byte magic + version
BLOCK = 32 * 1024  # records never straddle a block's 7-byte tail


def _payloads(data: bytes):
    pos, parts = HEADER, []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # block trailer too small for a header: skip it
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            yield b"".join(parts)
            parts = []


def history(run_file: Path) -> list[dict]:
    rows = []
    for payload in _payloads(Path(run_file).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                    for i in record.history.item
                }
            )
    return rows
