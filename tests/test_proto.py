"""The committed gRPC modules match proto/pdcluster.proto."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ("pdcluster_pb2.py", "pdcluster_pb2.pyi", "pdcluster_pb2_grpc.py")


def test_generated_modules_are_not_stale(tmp_path: Path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools (dev extra) not installed")
    (tmp_path / "proto").mkdir()
    shutil.copy(ROOT / "proto" / "pdcluster.proto", tmp_path / "proto" / "pdcluster.proto")
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{tmp_path}", f"-I{include}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}", str(tmp_path / "proto" / "pdcluster.proto")]
    assert protoc.main(args) == 0
    for name in GENERATED:
        fresh = (tmp_path / "proto" / name).read_text()
        committed = (ROOT / "proto" / name).read_text()
        assert fresh == committed, f"proto/{name} is stale: run `make proto` and commit the result"


def test_generated_modules_import_as_a_package() -> None:
    from proto import pdcluster_pb2, pdcluster_pb2_grpc

    assert hasattr(pdcluster_pb2_grpc, "WorkerServicer")
    assert pdcluster_pb2.DecodeEvent(token=pdcluster_pb2.Token(token_id=3)).WhichOneof("event") == "token"
