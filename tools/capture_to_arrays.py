"""Turn a user's network captures and CAN logs into the arrays the zoo's NetMamba and LSF-IDM models take.

  python tools/capture_to_arrays.py traffic CAPTURE.pcap [CAPTURE2.pcapng ...] --out flows.npz [--label NAME] [--force]
      Every IPv4 TCP/UDP flow of every capture (pcap or pcapng; Ethernet, raw IP, Linux cooked, BSD loopback link
      types), read with `zoo.data.traffic.read_pcap` (bidirectional 5-tuple flows, in order of first appearance, file
      after file) and laid out with `zoo.data.traffic.flow_bytes` -> an npz with
        packets       uint8 [N, 5, 320]  NetMamba's input (the loopback_traffic feature `packets`): per flow its first 5
                                         packets, each 80 bytes of IP + TCP/UDP header then 240 bytes of payload
                                         (cut / zero-padded), addresses, ports and checksums zeroed; zero rows past the
                                         flow's last packet;
        flow_packets  int32 [N]          the number of packets in each flow (all of them, not only the first 5);
        source        int32 [N]          the index, among the captures given, of the file each flow comes from;
        files         str [F]            the captures as given on the command line (files[source[i]] holds flow i);
        label         str [N]            with --label NAME: NAME for every flow.
      Prints one line per capture (its flows and packets) and a total.

  python tools/capture_to_arrays.py can LOG.log --out windows.npz [--unknown error|map] [--force]
      The CAN log (any format python-can reads, by its extension: .log (candump), .asc, .blf, .csv, .trc, ...) cut
      with `zoo.data.can_bus.windows_from_log` into consecutive windows of 32 CAN IDs (the trailing partial window is
      dropped) -> an npz with
        ids           int32 [N, 32]      LSF-IDM's input (the can_bus feature `ids`): vocabulary indices of the CAN IDs
                                         (`zoo.data.can_bus.ID_VOCABULARY`; 1 = an ID not in the message database);
        label         int32 [N]          only when the log has labels (its `LOG.log.labels` sidecar, one label per
                                         frame): the window's class, an index into `label_names`;
        label_names   str [5]            with `label`: `zoo.data.can_bus.LABELS` (normal, dos, fuzzy, spoofing, replay).
      --unknown error (the default) refuses a frame whose ID is not in the database; --unknown map maps such IDs to
      UNKNOWN. Prints the windows per label (or the number of windows of an unlabelled log).

Read the result with `numpy.load(OUT)` (no pickles: the strings are numpy unicode arrays).

--out is never overwritten silently: an existing --out is an error unless --force is given, and the arrays are always
written to a temporary file beside --out and renamed into place at the end, so a failed run leaves no half-written file
and, with --force, the old --out as it was. Bad input (a missing file, an unreadable capture or log, a capture with no
IPv4 TCP/UDP flow, a CAN ID outside the database with --unknown error, a log shorter than one window, an --out whose
directory does not exist, an existing --out without --force, an unknown command or option) prints one line
`capture_to_arrays: ...` on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import collections
import os
import stat
import sys
import tempfile

import numpy as np

PROG = "capture_to_arrays"


class _UsageError(Exception):
  """Bad input found by this script; printed as one line."""


class _Parser(argparse.ArgumentParser):
  """argparse with its errors as one line `capture_to_arrays: ...` (exit status 2) instead of usage + message."""

  def error(self, message):
    print(f"{PROG}: {' '.join(message.split())} (see --help)", file=sys.stderr)
    sys.exit(2)


def _check_inputs(paths: list[str]) -> None:
  for path in paths:
    if not os.path.exists(path):
      raise _UsageError(f"{path}: no such file")
    if not os.path.isfile(path):
      raise _UsageError(f"{path}: not a file")


def _check_out(out: str, force: bool, inputs: list[str]) -> None:
  """Refuses an --out that cannot be written or must not be replaced, before any input is read."""
  directory = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(directory):
    raise _UsageError(f"--out {out}: directory {os.path.dirname(out) or directory} does not exist")
  if os.path.isdir(out):
    raise _UsageError(f"--out {out} is a directory; allowed: a file name such as {os.path.join(out, 'arrays.npz')}")
  if os.path.lexists(out):
    for path in inputs:
      if os.path.exists(out) and os.path.exists(path) and os.path.samefile(path, out):
        raise _UsageError(f"--out {out} is the input {path}; choose another output file")
    if not force:
      raise _UsageError(f"--out {out} already exists; pass --force to replace it, or choose another file")


def _write_npz(f, arrays: dict[str, np.ndarray]) -> None:
  np.savez_compressed(f, **arrays)


def _save(out: str, arrays: dict[str, np.ndarray], force: bool) -> None:
  """Writes `arrays` to a temporary file beside `out`, then renames it to `out` (replacing it only with `force`)."""
  directory = os.path.dirname(os.path.abspath(out))
  if os.path.exists(out):
    mode = stat.S_IMODE(os.stat(out).st_mode)  # a replaced file keeps its permissions
  else:
    umask = os.umask(0)
    os.umask(umask)
    mode = 0o666 & ~umask  # as open() would create it (mkstemp's file is 0600)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      _write_npz(f, arrays)
    os.chmod(tmp, mode)
    if force:
      os.replace(tmp, out)
      return
    try:
      os.link(tmp, out)  # atomic and never replaces: `out` may have appeared while the inputs were read
    except FileExistsError:
      raise _UsageError(f"--out {out} already exists; pass --force to replace it, or choose another file") from None
    except OSError:  # a file system without hard links
      if os.path.lexists(out):
        raise _UsageError(f"--out {out} already exists; pass --force to replace it, or choose another file") from None
      os.replace(tmp, out)
  finally:
    if os.path.lexists(tmp):
      os.unlink(tmp)


def _traffic(args) -> None:
  if args.label is not None and not args.label.strip():
    raise _UsageError("--label must not be empty")
  _check_inputs(args.captures)
  _check_out(args.out, args.force, args.captures)
  from zoo.data import traffic  # pylint: disable=g-import-not-at-top

  packets, flow_packets, source = [], [], []
  for index, path in enumerate(args.captures):
    flows = traffic.read_pcap(path)
    packets += [traffic.flow_bytes(flow) for flow in flows]
    flow_packets += [len(flow) for flow in flows]
    source += [index] * len(flows)
    print(f"{path}: {len(flows)} flows, {sum(len(flow) for flow in flows)} packets")
  arrays = {
    "packets": np.stack(packets).astype(np.uint8),
    "flow_packets": np.asarray(flow_packets, np.int32),
    "source": np.asarray(source, np.int32),
    "files": np.asarray(args.captures, dtype=str),
  }
  if args.label is not None:
    arrays["label"] = np.asarray([args.label] * len(packets), dtype=str)
  _save(args.out, arrays, args.force)
  files = f"{len(args.captures)} capture" + ("s" if len(args.captures) > 1 else "")
  print(f"total: {len(packets)} flows, {sum(flow_packets)} packets from {files} -> {args.out}")


def _can(args) -> None:
  _check_inputs([args.log])
  _check_out(args.out, args.force, [args.log, args.log + ".labels"])
  from zoo.data import can_bus  # pylint: disable=g-import-not-at-top

  ids, labels = can_bus.windows_from_log(args.log, window=can_bus.WINDOW, unknown=args.unknown)
  if not len(ids):
    raise _UsageError(
      f"{args.log}: fewer than {can_bus.WINDOW} CAN frames, not one window of {can_bus.WINDOW}; nothing to write"
    )
  arrays = {"ids": ids.astype(np.int32)}
  if labels is not None:
    arrays["label"] = labels.astype(np.int32)
    arrays["label_names"] = np.asarray(can_bus.LABELS, dtype=str)
  _save(args.out, arrays, args.force)
  frames = ids.size
  if labels is None:
    print(f"{args.log}: {len(ids)} windows of {can_bus.WINDOW} CAN IDs (no labels: no {args.log}.labels)")
  else:
    counts = collections.Counter(labels.tolist())
    for index, name in enumerate(can_bus.LABELS):
      print(f"{name}: {counts.get(index, 0)} windows")
    print(f"{args.log}: {len(ids)} windows of {can_bus.WINDOW} CAN IDs")
  if args.unknown == "map":
    print(f"unknown CAN IDs mapped to UNKNOWN: {int((ids == can_bus.UNKNOWN).sum())} of {frames} frames in windows")
  print(f"-> {args.out}")


def main(argv: list[str] | None = None) -> int:
  """Runs the command line `argv` (default: sys.argv[1:]); returns the exit status (0, or 2 for bad input).
  argparse's own errors (unknown command or option) exit with status 2 through SystemExit."""
  parser = _Parser(prog=PROG + ".py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  traffic = sub.add_parser("traffic", help="pcap / pcapng captures -> NetMamba flows (npz)")
  traffic.add_argument("captures", nargs="+", metavar="CAPTURE", help="pcap or pcapng files")
  traffic.add_argument("--label", help="a class name stored as `label` for every flow")
  can = sub.add_parser("can", help="a CAN log -> LSF-IDM windows of CAN IDs (npz)")
  can.add_argument("log", metavar="LOG", help="a CAN log python-can reads (.log, .asc, .blf, .csv, .trc, ...)")
  can.add_argument(
    "--unknown",
    choices=("error", "map"),
    default="error",
    help="CAN IDs outside the message database: refuse them (error, default) or map them to UNKNOWN (map)",
  )
  for command in (traffic, can):
    command.add_argument("--out", required=True, help="the .npz file to write")
    command.add_argument("--force", action="store_true", help="replace an existing --out")
  args = parser.parse_args(argv)
  try:
    {"traffic": _traffic, "can": _can}[args.command](args)
  except (_UsageError, ValueError, OSError) as e:
    message = " ".join(str(e).split()) or type(e).__name__
    print(f"{PROG}: {message}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
