"""tools/capture_to_arrays.py: a user's captures and CAN logs -> the npz arrays of NetMamba and LSF-IDM; bad input is
one line on stderr with exit status 2, and an existing --out is replaced only with --force."""

import os
import subprocess
import sys

import can
import dpkt
import numpy as np
import pytest

from tools import capture_to_arrays as tool
from zoo.data import can_bus, traffic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "capture_to_arrays: "


def _ip(src, dst, sport, dport, payload, udp=False):
  """A raw IPv4 packet, assembled with dpkt (no server, no capture)."""
  if udp:
    transport = dpkt.udp.UDP(sport=sport, dport=dport, ulen=8 + len(payload), data=payload)
  else:
    transport = dpkt.tcp.TCP(sport=sport, dport=dport, seq=1000, ack=2000, flags=dpkt.tcp.TH_ACK, data=payload)
  address = lambda a: bytes(map(int, a.split(".")))
  return bytes(dpkt.ip.IP(src=address(src), dst=address(dst), p=17 if udp else 6, id=7, data=transport))


def _captures(directory):
  """A libpcap file of 2 flows (TCP: 3 packets, UDP: 1) and a pcapng file of 2 TCP flows (1 and 2 packets)."""
  request = _ip("10.0.0.1", "10.0.0.2", 51000, 80, b"GET /index.html HTTP/1.0\r\n\r\n")
  reply = _ip("10.0.0.2", "10.0.0.1", 80, 51000, b"HTTP/1.0 200 OK\r\n\r\n" + bytes(range(256)) * 2)
  query = _ip("10.0.0.1", "10.0.0.53", 40000, 53, b"\x12\x34" + bytes(10), udp=True)
  pcap = os.path.join(directory, "first.pcap")
  traffic.write_pcap(pcap, [[request, reply, request], [query]])
  hello = _ip("192.0.2.1", "192.0.2.9", 52000, 25, b"EHLO example.org\r\n")
  banner = _ip("192.0.2.9", "192.0.2.2", 995, 53000, b"+OK POP3 ready\r\n")
  pcapng = os.path.join(directory, "second.pcapng")
  with open(pcapng, "wb") as f:
    writer = dpkt.pcapng.Writer(f, linktype=traffic.LINKTYPE_RAW)
    for t, packet in enumerate((hello, banner, banner)):
      writer.writepkt(packet, ts=1.0 + t)
  return pcap, pcapng


def _message(frame_id, n):
  return can.Message(timestamp=0.001 * n, arbitration_id=frame_id, is_extended_id=False, data=bytes(8))


def _known(n):
  return can_bus.ID_VOCABULARY[2 + n % (can_bus.VOCAB_SIZE - 2)]


def _labelled_log(directory):
  """70 frames of database IDs (2 windows and a partial one), labelled: a normal window, then a DoS one."""
  path = os.path.join(directory, "labelled.log")
  frames = [(_message(_known(n), n), "normal") for n in range(40)]
  frames += [(_message(can_bus.DOS_ID if n % 2 else _known(n), n), "dos" if n % 2 else "normal") for n in range(40, 70)]
  can_bus.write_log(path, frames)
  return path


def _user_log(directory, ids, name="user.log"):
  """A log as a user records it: no labels sidecar."""
  path = os.path.join(directory, name)
  can_bus.write_log(path, [(_message(frame_id, n), None) for n, frame_id in enumerate(ids)])
  return path


def run(*argv):
  """The tool in-process: its exit status (argparse's errors exit through SystemExit)."""
  try:
    return tool.main([os.fspath(a) for a in argv])
  except SystemExit as e:
    return e.code


def _one_line_error(capsys):
  err = capsys.readouterr().err
  lines = err.splitlines()
  assert len(lines) == 1 and lines[0].startswith(PREFIX), err
  return lines[0]


def test_traffic_arrays_are_the_library_flows(tmp_path, capsys):
  pcap, pcapng = _captures(tmp_path)
  out = tmp_path / "flows.npz"
  assert run("traffic", pcap, pcapng, "--out", out, "--label", "http") == 0
  flows = [traffic.read_pcap(pcap), traffic.read_pcap(pcapng)]
  assert [len(f) for f in flows] == [2, 2]
  with np.load(out) as arrays:
    assert sorted(arrays.files) == ["files", "flow_packets", "label", "packets", "source"]
    assert arrays["packets"].dtype == np.uint8 and arrays["packets"].shape == (4, 5, 320)
    expected = np.stack([traffic.flow_bytes(flow) for file_flows in flows for flow in file_flows])
    np.testing.assert_array_equal(arrays["packets"], expected)
    assert arrays["flow_packets"].dtype == np.int32 and arrays["flow_packets"].tolist() == [3, 1, 1, 2]
    assert arrays["source"].dtype == np.int32 and arrays["source"].tolist() == [0, 0, 1, 1]
    assert arrays["files"].tolist() == [pcap, pcapng]
    assert arrays["label"].dtype.kind == "U" and arrays["label"].tolist() == ["http"] * 4
  assert capsys.readouterr().out.splitlines() == [
    f"{pcap}: 2 flows, 4 packets",
    f"{pcapng}: 2 flows, 3 packets",
    f"total: 4 flows, 7 packets from 2 captures -> {out}",
  ]
  assert sorted(os.listdir(tmp_path)) == ["first.pcap", "flows.npz", "second.pcapng"]  # no temporary file left

  assert run("traffic", pcapng, "--out", tmp_path / "one.npz") == 0
  with np.load(tmp_path / "one.npz") as arrays:
    assert "label" not in arrays.files
    np.testing.assert_array_equal(arrays["packets"], expected[2:])
    assert arrays["source"].tolist() == [0, 0] and arrays["files"].tolist() == [pcapng]


def test_can_arrays_are_the_library_windows(tmp_path, capsys):
  log = _labelled_log(tmp_path)
  out = tmp_path / "windows.npz"
  assert run("can", log, "--out", out, "--unknown", "map") == 0  # the DoS frames' ID 0x000 is not in the database
  ids, labels = can_bus.windows_from_log(log, unknown="map")
  assert labels.tolist() == [0, 1]
  with np.load(out) as arrays:
    assert sorted(arrays.files) == ["ids", "label", "label_names"]
    assert arrays["ids"].dtype == np.int32 and arrays["ids"].shape == (2, 32)
    np.testing.assert_array_equal(arrays["ids"], ids)
    assert arrays["label"].dtype == np.int32 and arrays["label"].tolist() == labels.tolist()
    assert arrays["label_names"].tolist() == list(can_bus.LABELS)
  printed = capsys.readouterr().out.splitlines()
  assert printed[:5] == [
    "normal: 1 windows",
    "dos: 1 windows",
    "fuzzy: 0 windows",
    "spoofing: 0 windows",
    "replay: 0 windows",
  ]
  assert f"{log}: 2 windows of 32 CAN IDs" in printed
  assert (ids == can_bus.UNKNOWN).sum() == 12  # the odd frames 41..63
  assert "unknown CAN IDs mapped to UNKNOWN: 12 of 64 frames in windows" in printed

  # A user's log (no labels) with IDs outside the database, mapped to UNKNOWN.
  user = _user_log(tmp_path, [0x7AB if n % 5 == 0 else _known(n) for n in range(64)])
  assert run("can", user, "--out", tmp_path / "user.npz", "--unknown", "map") == 0
  ids, labels = can_bus.windows_from_log(user, unknown="map")
  assert labels is None and (ids == can_bus.UNKNOWN).sum() == 13
  with np.load(tmp_path / "user.npz") as arrays:
    assert arrays.files == ["ids"]
    np.testing.assert_array_equal(arrays["ids"], ids)
  printed = capsys.readouterr().out
  assert "2 windows of 32 CAN IDs (no labels" in printed and "13 of 64 frames" in printed


def _bad_inputs(directory):
  """(argv, the words the one-line message must hold) per bad input."""
  d = str(directory)
  pcap, _ = _captures(d)
  garbage = os.path.join(d, "garbage.pcap")
  with open(garbage, "wb") as f:
    f.write(b"this is not a capture at all\n" * 4)
  arp_only = os.path.join(d, "arp.pcap")
  with open(arp_only, "wb") as f:
    dpkt.pcap.Writer(f, linktype=dpkt.pcap.DLT_EN10MB).writepkt(b"\xff" * 6 + b"\x04" * 6 + b"\x08\x06" + bytes(28))
  bad_log = os.path.join(d, "garbage.log")
  with open(bad_log, "wb") as f:
    f.write(b"\x00\xff\x13 not a candump line\n" * 3)
  unknown = _user_log(d, [0x0C4, 0x0D0, 0x7AB] + [0x0C4] * 61, name="unknown.log")
  short = _user_log(d, [0x0C4] * 31, name="short.log")
  out = os.path.join(d, "out.npz")
  missing_dir = os.path.join(d, "no_such_dir")
  return {
    "missing capture": (
      ["traffic", pcap, os.path.join(d, "missing.pcap"), "--out", out],
      [f"{d}/missing.pcap: no such file"],
    ),
    "unreadable pcap": (
      ["traffic", garbage, "--out", out],
      [f"{garbage}: not a pcap or pcapng capture", "unknown magic number 0x74686973"],
    ),
    "no IPv4 flows": (["traffic", arp_only, "--out", out], [f"{arp_only}: no IPv4 TCP/UDP flows in the capture"]),
    "empty label": (["traffic", pcap, "--out", out, "--label", " "], ["--label must not be empty"]),
    "missing log": (["can", os.path.join(d, "missing.log"), "--out", out], [f"{d}/missing.log: no such file"]),
    "unreadable log": (["can", bad_log, "--out", out], [f"{bad_log}: python-can cannot read it as a CAN log"]),
    "unknown CAN ID": (
      ["can", unknown, "--out", out],
      [f"{unknown}: frame 2 has CAN ID 0x7AB", "not in the message database", "unknown='map'"],
    ),
    "log shorter than a window": (["can", short, "--out", out], [f"{short}: fewer than 32 CAN frames"]),
    "out directory missing": (
      ["traffic", pcap, "--out", os.path.join(missing_dir, "flows.npz")],
      [f"--out {missing_dir}/flows.npz: directory {missing_dir} does not exist"],
    ),
    "out directory missing (can)": (
      ["can", unknown, "--out", os.path.join(missing_dir, "w.npz"), "--unknown", "map"],
      [f"directory {missing_dir} does not exist"],
    ),
    "out is the input": (["traffic", pcap, "--out", pcap, "--force"], [f"--out {pcap} is the input {pcap}"]),
    "unknown subcommand": (["pcap", pcap, "--out", out], ["invalid choice: 'pcap'"]),
    "unknown option": (["traffic", pcap, "--out", out, "--bogus"], ["unrecognized arguments: --bogus"]),
    "bad --unknown": (["can", unknown, "--out", out, "--unknown", "drop"], ["invalid choice: 'drop'"]),
    "no --out": (["traffic", pcap], ["required: --out"]),
  }


BAD_INPUTS = (
  "missing capture",
  "unreadable pcap",
  "no IPv4 flows",
  "empty label",
  "missing log",
  "unreadable log",
  "unknown CAN ID",
  "log shorter than a window",
  "out directory missing",
  "out directory missing (can)",
  "out is the input",
  "unknown subcommand",
  "unknown option",
  "bad --unknown",
  "no --out",
)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, capsys, case):
  cases = _bad_inputs(tmp_path)
  assert tuple(cases) == BAD_INPUTS
  argv, words = cases[case]
  before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
  capsys.readouterr()
  assert run(*argv) == 2
  line = _one_line_error(capsys)
  for word in words:
    assert word in line, line
  assert "Traceback" not in line
  # Nothing written (no output, no temporary file), no input touched.
  assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


def test_existing_out_is_kept_without_force_and_replaced_with_it(tmp_path, capsys, monkeypatch):
  pcap, _ = _captures(tmp_path)
  log = _labelled_log(tmp_path)
  out = tmp_path / "mine.npz"
  out.write_bytes(b"a user's own file\n")
  for argv in (["traffic", pcap, "--out", out], ["can", log, "--out", out, "--unknown", "map"]):
    assert run(*argv) == 2
    assert f"--out {out} already exists; pass --force to replace it" in _one_line_error(capsys)
    assert out.read_bytes() == b"a user's own file\n"

  # With --force, a failure before or while writing leaves the old file whole and no temporary file.
  files = sorted(os.listdir(tmp_path))
  garbage = tmp_path / "garbage.pcap"
  garbage.write_bytes(b"not a capture")
  assert run("traffic", garbage, "--out", out, "--force") == 2
  assert "not a pcap or pcapng capture" in _one_line_error(capsys)

  def full_disk(f, arrays):
    f.write(b"PK\x03\x04 half an npz")
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(tool, "_write_npz", full_disk)
  assert run("traffic", pcap, "--out", out, "--force") == 2
  assert "No space left on device" in _one_line_error(capsys)
  assert out.read_bytes() == b"a user's own file\n"
  assert sorted(os.listdir(tmp_path)) == sorted([*files, "garbage.pcap"])
  monkeypatch.undo()

  out.chmod(0o640)
  assert run("traffic", pcap, "--out", out, "--force") == 0
  with np.load(out) as arrays:
    np.testing.assert_array_equal(arrays["packets"], np.stack([traffic.flow_bytes(f) for f in traffic.read_pcap(pcap)]))
  assert out.stat().st_mode & 0o777 == 0o640  # the replaced file keeps its permissions
  assert run("can", log, "--out", out, "--unknown", "map", "--force") == 0
  with np.load(out) as arrays:
    np.testing.assert_array_equal(arrays["ids"], can_bus.windows_from_log(log, unknown="map")[0])
  assert sorted(os.listdir(tmp_path)) == sorted([*files, "garbage.pcap"])


def test_command_line_exit_status_and_one_line_stderr(tmp_path):
  garbage = tmp_path / "garbage.pcap"
  garbage.write_bytes(b"this is not a capture at all\n")
  out = tmp_path / "flows.npz"
  done = subprocess.run(
    [sys.executable, os.path.join(ROOT, "tools", "capture_to_arrays.py"), "traffic", str(garbage), "--out", str(out)],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 2, done.stderr
  assert done.stderr.count("\n") == 1 and done.stderr.startswith(PREFIX), done.stderr
  assert f"{garbage}: not a pcap or pcapng capture (unknown magic number 0x74686973)" in done.stderr
  assert not out.exists() and done.stdout == ""
