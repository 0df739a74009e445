"""Real network traffic made on this machine, for the NetMamba traffic classifier: `loopback_traffic`.

NetMamba (Wang et al. 2024, "NetMamba: Efficient Network Traffic Classification via Pre-training Unidirectional
Mamba") classifies a flow from its first 5 packets, each cut to the first 80 bytes of its IP + transport header and
the first 240 bytes of its payload (zero-padded), 5 x 320 = 1600 bytes, with the IP addresses zeroed. This module
makes such flows with no download: real clients and real servers of the Python standard library talk real protocols
over the loopback interface (127.0.0.1), and each conversation is turned into IPv4 packets, written to pcap and read
back. Each flow is labelled by its application (`APPLICATIONS`, in label order):

* `http`: `http.client` GETs (some HEADs, directory listings and 404s) of standard-library files
  (`sysconfig.get_paths()['stdlib']`, files of at most MAX_SERVED_BYTES) from `http.server.SimpleHTTPRequestHandler`
  (HTTP/1.0: one request per connection), with a few client User-Agent / Accept headers.
* `https`: the same over TLS (`ssl`); the client's context offers ALPN `http/1.1` and post-handshake auth, as
  `http.client` does with its default context.
* `dns`: 1 to 3 queries (A, AAAA, MX or TXT; names from stdlib module names under the RFC 2606 example zones, some
  under `.invalid` -> NXDOMAIN) from one client UDP socket to a small `dpkt.dns` server written here (answers in the
  documentation address ranges, TXT records from stdlib docstrings).
* `smtp`: an `smtplib` client sends 1 mail (1 to 3 recipients, body = 1 or 2 stdlib docstrings) to a small ESMTP
  server written here (`socketserver`); no authentication, as between mail servers on port 25.
* `smtps`: the same over implicit TLS (`smtplib.SMTP_SSL`, "port 465" submission), with AUTH PLAIN login first.
* `pop3`: a `poplib` client logs in (USER/PASS), runs STAT / LIST and sometimes CAPA / UIDL, retrieves (RETR or TOP)
  some of the 1 to 6 mails of its mailbox from a small POP3 server written here, and quits.
* `pop3s`: the same over implicit TLS (`poplib.POP3_SSL`, "port 995"); the client offers the IANA-registered ALPN id
  `pop3` [guess: poplib's default context offers none; without it smtps and pop3s would send byte-identical
  ClientHellos and be indistinguishable in their first 5 packets].
* `ftp`: an `ftplib` client logs in, sometimes runs SYST / PWD / CWD / SIZE / NLST, retrieves 1 to 3 stdlib files in
  passive mode and quits, against a small FTP server written here. Only the control connection is the flow: the
  data connections go straight to the server, not through the recorder.
* `xmlrpc`: an `xmlrpc.client.ServerProxy` makes 1 to 3 calls (some as one `system.multicall`) to a threaded
  `xmlrpc.server.SimpleXMLRPCServer` over one HTTP/1.1 keep-alive connection; functions on numbers, strings, lists
  and stdlib docstrings, with random arguments.

The content of each flow is drawn from `random.Random(f"{seed}/{application}")`, so it is reproducible for a seed;
the segmentation is not quite: what one read returns depends on timing (e.g. a request written in two pieces may be
recorded as one chunk or two), and a few bytes vary from run to run (HTTP `Date` headers, the proxy's ephemeral port
in `Host` headers and in FTP PASV replies, TLS keys and ciphertext).

How the packets are obtained. A raw capture (tcpdump, AF_PACKET) needs root or CAP_NET_RAW, which a user may not have.
Instead every TCP connection goes through a recording relay on loopback: client -> proxy -> server, and the proxy
records each chunk it reads in each direction, in order, and each end of stream (end of stream and a reset both count
as the side's FIN). DNS datagrams are recorded by the client as it sends and receives them. The recorded conversation
is then assembled into IPv4 packets with dpkt:

* IPv4: no options, DF set, TTL 64, an IP id per side from a random start, incremented per packet.
* TCP, options-free 20-byte headers (no MSS / SACK / timestamp / window-scale options), windows 64240 (client) and
  65160 (server): the three-way handshake (SYN, SYN-ACK, ACK) from random initial sequence numbers; each recorded
  chunk as data segments of at most MSS = 1460 bytes (ACK, plus PSH on a chunk's last segment) with consistent
  seq/ack; after every data segment the receiver sends a pure ACK [guess: Linux acknowledges at once while in quick-ack
  mode, as at the start of a connection; no delayed or piggy-backed ACKs are modelled]; each side's end of stream as a
  FIN/ACK answered by a pure ACK (a four-way close, in the order the proxy saw the two ends).
* UDP for DNS, one datagram per packet.
* Addresses: client and server are both 127.0.0.1; the server port is the application's well-known port
  (`SERVER_PORTS`), the client port a distinct ephemeral port (32768-60999) per flow of an application, both drawn
  here rather than the real ephemeral ports of the relay, so that one pcap holds many flows with distinct 5-tuples
  and the same seed gives the same ports. IP and TCP/UDP checksums are computed by dpkt over these addresses.

`generate_flows` returns these packets (with addresses and ports, so that `write_pcap` / `read_pcap` keep the flows
apart); `flow_bytes` makes the model input and zeroes, in every packet: the IP source and destination addresses (as
NetMamba), the TCP/UDP source and destination ports [guess: a deliberate difference from NetMamba, which keeps them,
so that the label cannot be read off the well-known port], and the IP header checksum and the TCP/UDP checksum
(both computed over the zeroed fields, so they would give them away).

TLS: the servers use the self-signed certificate and key in `loopback_tls/` (EC P-256, CN=localhost with SANs
localhost and 127.0.0.1, CA:TRUE with keyCertSign and serverAuth usages, valid 2024-01-01 to 2036-12-31, made with
the openssl command line (`req -new`, then `ca -selfsign` with those dates, so that a machine whose clock is behind
the one that made it still accepts it); a throwaway key used only on loopback). The clients trust it as their CA and
check it fully (`ssl.create_default_context(cafile=...)`, host name 127.0.0.1). TLS 1.3 is negotiated (OpenSSL
defaults); the server sends its default 2 session tickets. Both ends address 127.0.0.1, so no SNI is sent.

`read_pcap` also reads users' own captures (pcap or pcapng; Ethernet, raw IP, Linux cooked v1/v2, BSD loopback link
types) and groups their IPv4 TCP/UDP packets into bidirectional 5-tuple flows, so a model trained here can be run on
them through `flow_bytes`.

How this differs from NetMamba's datasets. The paper uses real captures of public datasets (CICIoT2022, ISCX-VPN2016,
ISCX-Tor2016, USTC-TFC2016, CrossPlatform Android / iOS) with many more classes, many hosts and client
implementations, and real network conditions. Here: one machine, the loopback interface, 9 classes, one client and one
server implementation per application, no loss or retransmission, no real latency or reordering (the recording order
is kept), a synthetic ACK pattern and options-free TCP headers, an Ethernet-like MSS on an interface whose real MTU is
64 KiB, and no background traffic. The handshake packets are identical in layout across TCP applications (only random
sequence numbers and IP ids differ), and with an ACK after every data segment the first 5 packets of a TCP flow are
SYN, SYN-ACK, ACK, the first data segment and its ACK; so the classes differ by that first data segment: the server
banner (smtp, pop3, ftp), the request (http, xmlrpc), or the TLS ClientHello (https / smtps / pop3s: its ALPN and
post-handshake-auth extensions; OpenSSL pads every ClientHello to the same 517 bytes). The layout also differs in
details from NetMamba's reference preprocessing (which uses scapy): there the checksums computed before zeroing and
the ports are kept, and for packets scapy decodes past the transport layer (e.g. DNS) the "header" part runs on into
the application bytes; here the split is always at the end of the TCP/UDP header.
"""

from __future__ import annotations

import ast
import contextlib
import email.message
import email.utils
import ftplib
import functools
import hashlib
import http.client
import http.server
import inspect
import os
import poplib
import queue
import random
import selectors
import smtplib
import socket
import socketserver
import ssl
import struct
import sys
import sysconfig
import tempfile
import threading
import xmlrpc.client
import xmlrpc.server
from collections.abc import Iterable, Sequence

import dpkt
import numpy as np
import tensorflow_datasets as tfds

APPLICATIONS: tuple[str, ...] = ("http", "https", "dns", "smtp", "smtps", "pop3", "pop3s", "ftp", "xmlrpc")
TLS_APPLICATIONS = frozenset({"https", "smtps", "pop3s"})
# The server port written into the packets (the real servers listen on OS-chosen ports); zeroed by `flow_bytes`.
SERVER_PORTS = {
  "http": 80,
  "https": 443,
  "dns": 53,
  "smtp": 25,
  "smtps": 465,
  "pop3": 110,
  "pop3s": 995,
  "ftp": 21,
  "xmlrpc": 8000,
}
PACKETS_PER_FLOW, HEADER_BYTES, PAYLOAD_BYTES = 5, 80, 240  # NetMamba's flow layout
MSS = 1460
CLIENT_WINDOW, SERVER_WINDOW = 64240, 65160
MAX_SERVED_BYTES = 32 * 1024  # stdlib files served over HTTP / FTP are at most this long
TLS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loopback_tls")
CERT_FILE, KEY_FILE = os.path.join(TLS_DIR, "cert.pem"), os.path.join(TLS_DIR, "key.pem")
LINKTYPE_RAW = 101  # the pcap file value of DLT_RAW (raw IPv4/IPv6, no link header)

_LOOPBACK = "127.0.0.1"
_LOOPBACK_BYTES = socket.inet_aton(_LOOPBACK)
_IO_TIMEOUT = 10.0  # seconds; a stalled exchange fails instead of hanging
_POLL = 0.05  # seconds between checks of a stop flag
_EPHEMERAL_PORTS = range(32768, 61000)
_NOT_A_CAPTURE = (
  "{path}: not a pcap or pcapng capture ({reason}); allowed: a libpcap .pcap or .pcapng file of IPv4 traffic"
)


# ------------------------------------------------------------------------------------------------ content pools


@functools.cache
def _served_files() -> tuple[str, ...]:
  """Relative paths ('/'-separated, sorted) of the stdlib *.py files of at most MAX_SERVED_BYTES, outside tests and
  installed packages."""
  root = sysconfig.get_paths()["stdlib"]
  skipped = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib-dynload"}
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in skipped and not d.startswith(("config-", ".")))
    for name in filenames:
      path = os.path.join(dirpath, name)
      if name.endswith(".py") and os.path.getsize(path) <= MAX_SERVED_BYTES:
        found.append(os.path.relpath(path, root).replace(os.sep, "/"))
  if not found:
    raise RuntimeError(f"no standard-library *.py files under {root}")
  return tuple(sorted(found))


@functools.cache
def _served_dirs() -> tuple[str, ...]:
  return tuple(sorted({p.rsplit("/", 1)[0] for p in _served_files() if "/" in p}))


@functools.cache
def _words() -> tuple[str, ...]:
  """Stdlib module names usable as DNS labels and user names ('heapq', 'textwrap', ...)."""
  names = {p.rsplit("/", 1)[-1][:-3] for p in _served_files()}
  return tuple(sorted(n for n in names if n.isalpha() and n.islower() and 3 <= len(n) <= 20))


# Modules whose docstrings (module, classes, functions) make the mail bodies, TXT records and XML-RPC strings.
_DOCSTRING_MODULES = (
  "argparse",
  "base64",
  "bisect",
  "calendar",
  "contextlib",
  "difflib",
  "email/utils",
  "fractions",
  "ftplib",
  "functools",
  "heapq",
  "http/client",
  "json/__init__",
  "poplib",
  "queue",
  "random",
  "shutil",
  "smtplib",
  "statistics",
  "string",
  "textwrap",
  "urllib/parse",
)


@functools.cache
def _docstrings() -> tuple[str, ...]:
  """Docstrings (cleaned, at least 40 characters) of the definitions of `_DOCSTRING_MODULES`, in source order."""
  root = sysconfig.get_paths()["stdlib"]
  found = []
  for module in _DOCSTRING_MODULES:
    for path in (os.path.join(root, module + ".py"), os.path.join(root, module, "__init__.py")):
      if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
          tree = ast.parse(f.read())
        for node in ast.walk(tree):
          if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 40:
              found.append(inspect.cleandoc(doc))
        break
  if not found:
    raise RuntimeError(f"no docstrings found in the standard library under {root}")
  return tuple(found)


def _address(rng: random.Random, zones=("example.com", "example.org", "example.net")) -> str:
  return f"{rng.choice(_words())}@{rng.choice(zones)}"


def _pool_mail(index: int) -> bytes:
  """The `index`-th mail of the POP3 servers' message store (headers + a stdlib docstring), CRLF line ends."""
  docs = _docstrings()
  rng = random.Random(f"mail/{index}")
  body = docs[index % len(docs)]
  msg = email.message.EmailMessage()
  msg["From"] = _address(rng)
  msg["To"] = _address(rng)
  msg["Subject"] = body.splitlines()[0][:70]
  msg["Date"] = email.utils.formatdate(1_700_000_000 + rng.randrange(30_000_000))
  msg["Message-ID"] = f"<{rng.getrandbits(64):016x}@example.org>"
  msg.set_content(body)
  return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def _mailbox(user: str) -> list[bytes]:
  """The mails of `user`'s POP3 mailbox: 1 to 6 mails of the store, chosen by the user name."""
  rng = random.Random(f"mailbox/{user}")
  return [_pool_mail(rng.randrange(len(_docstrings()))) for _ in range(rng.randint(1, 6))]


# ------------------------------------------------------------------------------------------------ TLS


def _server_context(alpn: Sequence[str] = ()) -> ssl.SSLContext:
  context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  context.load_cert_chain(CERT_FILE, KEY_FILE)
  if alpn:
    context.set_alpn_protocols(list(alpn))
  return context


def _client_context(alpn: Sequence[str] = (), post_handshake_auth: bool = False) -> ssl.SSLContext:
  context = ssl.create_default_context(cafile=CERT_FILE)  # verifies the certificate and the name 127.0.0.1
  if alpn:
    context.set_alpn_protocols(list(alpn))
  if post_handshake_auth:
    context.post_handshake_auth = True
  return context


def _with_tls(handler: type, context: ssl.SSLContext) -> type:
  """A subclass of the socketserver handler `handler` that speaks TLS (server side) on its connection."""

  class TLSHandler(handler):
    def setup(self):
      self.request.settimeout(_IO_TIMEOUT)
      self.request = context.wrap_socket(self.request, server_side=True)
      super().setup()

    def finish(self):
      try:
        super().finish()
      finally:
        self.request.close()  # the TLS socket (socketserver closes the detached plain one)

  return TLSHandler


# ------------------------------------------------------------------------------------------------ servers


class _NoDelayMixIn:
  """Accepted connections send each write at once (TCP_NODELAY): without it, Nagle's algorithm holds a small reply
  (e.g. a banner after the TLS session tickets) until the previous one is acknowledged, a delayed ACK away."""

  def get_request(self):
    connection, address = super().get_request()
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection, address


class _TCPServer(_NoDelayMixIn, socketserver.ThreadingMixIn, socketserver.TCPServer):
  """A threaded TCP server on 127.0.0.1 and an OS-chosen port; `server_close` joins its handler threads."""

  daemon_threads = False
  block_on_close = True

  def __init__(self, handler: type):
    self.errors: list[BaseException] = []
    super().__init__((_LOOPBACK, 0), handler)

  def handle_error(self, request, client_address):
    self.errors.append(sys.exc_info()[1])  # `_application` raises them: a flow cut short by a server error is not kept


class _XMLRPCServer(_NoDelayMixIn, socketserver.ThreadingMixIn, xmlrpc.server.SimpleXMLRPCServer):
  daemon_threads = False
  block_on_close = True

  def __init__(self, *args, **kwargs):
    self.errors: list[BaseException] = []
    super().__init__(*args, **kwargs)

  def handle_error(self, request, client_address):
    self.errors.append(sys.exc_info()[1])


class _QuietHTTPHandler(http.server.SimpleHTTPRequestHandler):
  """Serves the stdlib directory, without logging."""

  timeout = _IO_TIMEOUT

  def __init__(self, *args, **kwargs):
    super().__init__(*args, directory=sysconfig.get_paths()["stdlib"], **kwargs)

  def log_message(self, format, *args):  # the base class's signature
    pass


class _KeepAliveXMLRPCHandler(xmlrpc.server.SimpleXMLRPCRequestHandler):
  protocol_version = "HTTP/1.1"  # several calls on one connection, until the client closes it
  rpc_paths = ("/RPC2",)
  timeout = _IO_TIMEOUT


class _LineHandler(socketserver.StreamRequestHandler):
  """A line-based text protocol server (SMTP, POP3, FTP): `reply` writes CRLF lines, `lines` reads commands."""

  timeout = _IO_TIMEOUT

  def reply(self, *lines: str | bytes) -> None:
    self.wfile.write(b"".join((line.encode() if isinstance(line, str) else line) + b"\r\n" for line in lines))
    self.wfile.flush()

  def lines(self):
    while True:
      line = self.rfile.readline(8192)
      if not line:
        return
      yield line.rstrip(b"\r\n").decode("utf-8", "replace")


class _SMTPHandler(_LineHandler):
  """A minimal ESMTP server (RFC 5321): EHLO/HELO, AUTH PLAIN (when `auth`), MAIL, RCPT, DATA, RSET, NOOP, QUIT."""

  auth = False

  def handle(self):
    self.reply("220 mail.example.org ESMTP ready")
    for line in self.lines():
      verb, _, arg = line.partition(" ")
      verb = verb.upper()
      if verb == "EHLO":
        self.reply(
          f"250-mail.example.org greets {arg}",
          "250-SIZE 10485760",
          "250-8BITMIME",
          *(["250-AUTH PLAIN"] if self.auth else []),
          "250 HELP",
        )
      elif verb == "HELO":
        self.reply(f"250 mail.example.org greets {arg}")
      elif verb == "AUTH" and self.auth:
        self.reply("235 2.7.0 Authentication successful")
      elif verb == "MAIL":
        self.reply("250 2.1.0 Ok")
      elif verb == "RCPT":
        self.reply("250 2.1.5 Ok")
      elif verb == "DATA":
        self.reply("354 End data with <CR><LF>.<CR><LF>")
        size = 0
        while True:
          data = self.rfile.readline(65536)
          if not data or data == b".\r\n":
            break
          size += len(data)
        digest = hashlib.sha256(str(size).encode()).hexdigest()[:10].upper()
        self.reply(f"250 2.0.0 Ok: queued as {digest}")
      elif verb in ("RSET", "NOOP"):
        self.reply("250 2.0.0 Ok")
      elif verb == "QUIT":
        self.reply("221 2.0.0 Bye")
        return
      else:
        self.reply("502 5.5.2 Error: command not recognized")


class _SMTPAuthHandler(_SMTPHandler):
  auth = True


class _POP3Handler(_LineHandler):
  """A minimal POP3 server (RFC 1939 + CAPA): USER, PASS, STAT, LIST, UIDL, RETR, TOP, DELE, NOOP, RSET, QUIT."""

  def handle(self):
    self.reply(f"+OK POP3 server ready <{os.getpid()}.{threading.get_ident() % 100000}@mail.example.org>")
    user, mails, deleted = None, [], set()
    for line in self.lines():
      verb, _, arg = line.partition(" ")
      verb, args = verb.upper(), arg.split()
      number = int(args[0]) if args and args[0].isdigit() else 0
      valid = 1 <= number <= len(mails) and number not in deleted
      if verb == "CAPA":
        self.reply("+OK Capability list follows", "USER", "UIDL", "TOP", "RESP-CODES", ".")
      elif verb == "USER":
        user = arg
        self.reply("+OK")
      elif verb == "PASS" and user is not None:
        mails = _mailbox(user)
        self.reply(f"+OK Logged in, {len(mails)} messages ({sum(map(len, mails))} octets)")
      elif verb == "STAT":
        live = [m for i, m in enumerate(mails, 1) if i not in deleted]
        self.reply(f"+OK {len(live)} {sum(map(len, live))}")
      elif verb in ("LIST", "UIDL") and not args:
        self.reply(
          "+OK",
          *(
            f"{i} {len(m) if verb == 'LIST' else hashlib.sha256(m).hexdigest()[:16]}"
            for i, m in enumerate(mails, 1)
            if i not in deleted
          ),
          ".",
        )
      elif verb in ("LIST", "UIDL") and valid:
        mail = mails[number - 1]
        self.reply(f"+OK {number} {len(mail) if verb == 'LIST' else hashlib.sha256(mail).hexdigest()[:16]}")
      elif verb in ("RETR", "TOP") and valid:
        mail = mails[number - 1]
        if verb == "TOP":
          head, _, body = mail.partition(b"\r\n\r\n")
          keep = int(args[1]) if len(args) > 1 and args[1].isdigit() else 0
          mail = head + b"\r\n\r\n" + b"\r\n".join(body.split(b"\r\n")[:keep])
        stuffed = [b"." + line if line.startswith(b".") else line for line in mail.split(b"\r\n")]
        self.reply(f"+OK {len(mail)} octets", *stuffed, ".")
      elif verb == "DELE" and valid:
        deleted.add(number)
        self.reply(f"+OK message {number} deleted")
      elif verb in ("NOOP", "RSET"):
        deleted = set() if verb == "RSET" else deleted
        self.reply("+OK")
      elif verb == "QUIT":
        self.reply("+OK Bye")
        return
      else:
        self.reply("-ERR unknown command or no such message")


class _FTPHandler(_LineHandler):
  """A minimal FTP server (RFC 959, passive mode only) over the stdlib directory, read-only: USER, PASS, SYST, FEAT,
  PWD, CWD, TYPE, PASV, SIZE, RETR, NLST, NOOP, QUIT."""

  def handle(self):
    root = sysconfig.get_paths()["stdlib"]
    cwd, data_listener = "", None
    self.reply("220 FTP server ready.")
    try:
      for line in self.lines():
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        path = os.path.normpath("/" + (arg if arg.startswith("/") else f"{cwd}/{arg}")).lstrip("/")
        local = os.path.join(root, path)
        if verb == "USER":
          self.reply(f"331 Password required for {arg}.")
        elif verb == "PASS":
          self.reply("230 User logged in.")
        elif verb == "SYST":
          self.reply("215 UNIX Type: L8")
        elif verb == "FEAT":
          self.reply("211-Features:", " PASV", " SIZE", " UTF8", "211 End")
        elif verb == "PWD":
          self.reply(f'257 "/{cwd}" is the current directory.')
        elif verb == "CWD" and os.path.isdir(local):
          cwd = path
          self.reply("250 Directory successfully changed.")
        elif verb == "TYPE":
          self.reply(f"200 Type set to {arg or 'A'}.")
        elif verb == "NOOP":
          self.reply("200 NOOP ok.")
        elif verb == "SIZE" and os.path.isfile(local):
          self.reply(f"213 {os.path.getsize(local)}")
        elif verb == "PASV":
          if data_listener is not None:
            data_listener.close()
          data_listener = socket.create_server((_LOOPBACK, 0))
          data_listener.settimeout(_IO_TIMEOUT)
          port = data_listener.getsockname()[1]
          self.reply(f"227 Entering Passive Mode (127,0,0,1,{port >> 8},{port & 255}).")
        elif verb in ("RETR", "NLST") and data_listener is not None:
          if verb == "RETR" and os.path.isfile(local):
            with open(local, "rb") as f:
              data = f.read()
            self.reply(f"150 Opening BINARY mode data connection for /{path} ({len(data)} bytes).")
          elif verb == "NLST" and os.path.isdir(local):
            data = "".join(f"{name}\r\n" for name in sorted(os.listdir(local))).encode()
            self.reply("150 Here comes the directory listing.")
          else:
            self.reply("550 Failed to open file.")
            continue
          connection, _ = data_listener.accept()
          with connection:
            connection.sendall(data)
          data_listener.close()
          data_listener = None
          self.reply("226 Transfer complete.")
        elif verb == "QUIT":
          self.reply("221 Goodbye.")
          return
        else:
          self.reply("550 Requested action not taken." if verb in ("CWD", "SIZE") else "502 Command not implemented.")
    finally:
      if data_listener is not None:
        data_listener.close()


def _dns_reply(query: dpkt.dns.DNS) -> dpkt.dns.DNS:
  """The answer of the loopback DNS server: names under .invalid do not exist; other names get 1 to 3 A / 1 AAAA
  records in the documentation ranges, an MX record, or a TXT record (a docstring's first line), by a hash of the
  name."""
  reply = dpkt.dns.DNS(id=query.id, qd=list(query.qd), an=[], ns=[], ar=[])
  reply.qr, reply.opcode, reply.rd, reply.ra = dpkt.dns.DNS_R, query.opcode, query.rd, 1
  for question in query.qd:
    name = question.name.lower()
    if name.endswith(".invalid") or name == "invalid":
      reply.rcode = dpkt.dns.DNS_RCODE_NXDOMAIN
      continue
    digest = hashlib.sha256(name.encode()).digest()
    ttl = 60 * (1 + digest[0] % 60)
    rr = functools.partial(dpkt.dns.DNS.RR, name=question.name, type=question.type, cls=dpkt.dns.DNS_IN, ttl=ttl)
    if question.type == dpkt.dns.DNS_A:
      nets = (b"\xc0\x00\x02", b"\xc6\x33\x64", b"\xcb\x00\x71")  # 192.0.2/24, 198.51.100/24, 203.0.113/24
      for i in range(1 + digest[1] % 3):
        reply.an.append(rr(ip=nets[(digest[1] + i) % 3] + bytes([1 + digest[2 + i] % 254])))
    elif question.type == dpkt.dns.DNS_AAAA:
      reply.an.append(rr(ip6=b"\x20\x01\x0d\xb8" + digest[4:16]))
    elif question.type == dpkt.dns.DNS_MX:
      reply.an.append(rr(preference=10 * (1 + digest[1] % 3), mxname="mail." + name.partition(".")[2]))
    elif question.type == dpkt.dns.DNS_TXT:
      docs = _docstrings()
      text = docs[int.from_bytes(digest[:4], "big") % len(docs)].splitlines()[0]
      reply.an.append(rr(text=[text.encode("ascii", "replace")[:255]]))
  return reply


class _DNSHandler(socketserver.BaseRequestHandler):
  def handle(self):
    data, sock = self.request
    try:
      query = dpkt.dns.DNS(data)
    except (dpkt.UnpackError, IndexError, struct.error):
      return
    sock.sendto(bytes(_dns_reply(query)), self.client_address)


class _DNSServer(socketserver.UDPServer):
  def __init__(self):
    super().__init__((_LOOPBACK, 0), _DNSHandler)

  def handle_error(self, request, client_address):
    pass


class _Running:
  """A socketserver serving in a daemon thread; `close` stops it and joins its threads."""

  def __init__(self, server: socketserver.BaseServer):
    self.server = server
    self.port = server.server_address[1]
    self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": _POLL}, daemon=True)
    self._thread.start()

  def close(self):
    self.server.shutdown()
    self.server.server_close()
    self._thread.join()


# ------------------------------------------------------------------------------------------------ recording proxy


class _RecordingProxy:
  """A TCP relay on 127.0.0.1 (OS-chosen `port`) to `target_port`, one connection at a time, in a daemon thread.

  For each connection it puts on `conversations` the list of (side, chunk) it read, in order: side 0 = client ->
  server, 1 = server -> client; an empty chunk = that side's end of stream (or reset).
  """

  def __init__(self, target_port: int):
    self._target = (_LOOPBACK, target_port)
    self._listener = socket.create_server((_LOOPBACK, 0))
    self._listener.settimeout(_POLL)
    self.port = self._listener.getsockname()[1]
    self.conversations: queue.Queue = queue.Queue()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._serve, daemon=True)
    self._thread.start()

  def _serve(self):
    while not self._stop.is_set():
      try:
        client, _ = self._listener.accept()
      except TimeoutError:
        continue
      with client:
        try:
          self.conversations.put(self._relay(client))
        except OSError as e:
          self.conversations.put(e)

  def _relay(self, client: socket.socket) -> list[tuple[int, bytes]]:
    events = []
    with socket.create_connection(self._target, timeout=_IO_TIMEOUT) as server:
      peers, sides = {client: server, server: client}, {client: 0, server: 1}
      for sock in peers:
        sock.settimeout(_IO_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
      with selectors.DefaultSelector() as selector:
        for sock in peers:
          selector.register(sock, selectors.EVENT_READ)
        while selector.get_map():
          ready = selector.select(_IO_TIMEOUT)
          if not ready:
            raise TimeoutError(f"loopback conversation with port {self._target[1]} stalled")
          for key, _ in ready:
            sock = key.fileobj
            try:
              data = sock.recv(65536)
            except ConnectionResetError:
              data = b""
            events.append((sides[sock], data))
            if data:
              with contextlib.suppress(OSError):  # the peer is gone; its own end of stream comes next
                peers[sock].sendall(data)
            else:
              selector.unregister(sock)
              with contextlib.suppress(OSError):
                peers[sock].shutdown(socket.SHUT_WR)
    return events

  def next_conversation(self) -> list[tuple[int, bytes]]:
    result = self.conversations.get(timeout=2 * _IO_TIMEOUT)
    if isinstance(result, BaseException):
      raise result
    return result

  def close(self):
    self._stop.set()
    self._thread.join()
    self._listener.close()


# ------------------------------------------------------------------------------------------------ clients

_USER_AGENTS = (
  "Python-urllib/3.11",
  "curl/8.5.0",
  "Wget/1.21.4",
  "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
  "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
)
_ACCEPTS = ("*/*", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", "text/x-python, text/plain")


def _http_client(rng: random.Random, port: int, context: ssl.SSLContext | None = None) -> None:
  draw = rng.random()
  method, path = "GET", "/" + rng.choice(_served_files())
  if draw < 0.1:
    method = "HEAD"
  elif draw < 0.18:
    path = "/" + rng.choice(_served_dirs()) + "/"
  elif draw < 0.24:
    path += rng.choice((".orig", ".bak", "~"))  # 404
  headers = {"User-Agent": rng.choice(_USER_AGENTS), "Accept": rng.choice(_ACCEPTS)}
  if rng.random() < 0.5:
    headers["Accept-Language"] = rng.choice(("en-US,en;q=0.5", "de-DE,de;q=0.9,en;q=0.7", "fr-FR,fr;q=0.8"))
  if context is None:
    connection = http.client.HTTPConnection(_LOOPBACK, port, timeout=_IO_TIMEOUT)
  else:
    connection = http.client.HTTPSConnection(_LOOPBACK, port, timeout=_IO_TIMEOUT, context=context)
  try:
    connection.request(method, path, headers=headers)
    connection.getresponse().read()
  finally:
    connection.close()


def _mail(rng: random.Random, sender: str, recipients: list[str]) -> email.message.EmailMessage:
  docs = _docstrings()
  body = "\n\n".join(rng.choice(docs) for _ in range(rng.randint(1, 2)))
  msg = email.message.EmailMessage()
  msg["From"], msg["To"] = sender, ", ".join(recipients)
  msg["Subject"] = body.splitlines()[0][:70]
  msg["Date"] = email.utils.formatdate(1_700_000_000 + rng.randrange(30_000_000))
  msg["Message-ID"] = f"<{rng.getrandbits(64):016x}@{sender.partition('@')[2]}>"
  msg.set_content(body)
  return msg


def _smtp_client(rng: random.Random, port: int, context: ssl.SSLContext | None = None) -> None:
  sender = _address(rng)
  recipients = [_address(rng) for _ in range(rng.randint(1, 3))]
  hostname = f"{rng.choice(_words())}.example.net"
  if context is None:
    client = smtplib.SMTP(_LOOPBACK, port, local_hostname=hostname, timeout=_IO_TIMEOUT)
  else:
    client = smtplib.SMTP_SSL(_LOOPBACK, port, local_hostname=hostname, timeout=_IO_TIMEOUT, context=context)
  with client:
    if rng.random() < 0.2:
      client.noop()
    if context is not None:
      client.login(sender.partition("@")[0], f"{rng.getrandbits(48):012x}")
    client.send_message(_mail(rng, sender, recipients))
    client.quit()


def _pop3_client(rng: random.Random, port: int, context: ssl.SSLContext | None = None) -> None:
  if context is None:
    client = poplib.POP3(_LOOPBACK, port, timeout=_IO_TIMEOUT)
  else:
    client = poplib.POP3_SSL(_LOOPBACK, port, timeout=_IO_TIMEOUT, context=context)
  try:
    if rng.random() < 0.3:
      client.capa()
    client.user(f"{rng.choice(_words())}{rng.randrange(100)}")
    client.pass_(f"{rng.getrandbits(48):012x}")
    count, _ = client.stat()
    client.list()
    if rng.random() < 0.4:
      client.uidl()
    for number in rng.sample(range(1, count + 1), rng.randint(1, count)):
      if rng.random() < 0.25:
        client.top(number, rng.randint(0, 5))
      else:
        client.retr(number)
      if rng.random() < 0.2:
        client.dele(number)
    client.quit()
  finally:
    client.close()


def _ftp_client(rng: random.Random, port: int) -> None:
  client = ftplib.FTP(timeout=_IO_TIMEOUT)
  try:
    client.connect(_LOOPBACK, port)
    if rng.random() < 0.3:
      client.login()  # anonymous
    else:
      client.login(f"{rng.choice(_words())}{rng.randrange(100)}", f"{rng.getrandbits(48):012x}")
    if rng.random() < 0.3:
      client.sendcmd("SYST")
    if rng.random() < 0.3:
      client.pwd()
    paths = ["/" + rng.choice(_served_files()) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.3 and paths[0].count("/") > 1:
      directory, paths[0] = paths[0].rsplit("/", 1)  # the first file by its name in its directory
      client.cwd(directory)
      if rng.random() < 0.5:
        client.nlst()
    for path in paths:
      if rng.random() < 0.3:
        client.size(path)
      client.retrbinary(f"RETR {path}", lambda block: None)
    client.quit()
  finally:
    client.close()


def _register_xmlrpc_functions(server: xmlrpc.server.SimpleXMLRPCServer) -> None:
  docs = _docstrings()
  server.register_introspection_functions()
  server.register_multicall_functions()
  server.register_function(pow, "pow")
  server.register_function(lambda a, b: a + b, "add")
  server.register_function(lambda values: sorted(values), "sort")
  server.register_function(lambda text: text.upper(), "upper")
  server.register_function(lambda text: len(text.split()), "word_count")
  server.register_function(lambda values: {"n": len(values), "mean": sum(values) / max(len(values), 1)}, "stats")
  server.register_function(lambda index: docs[index % len(docs)], "docstring")


def _xmlrpc_client(rng: random.Random, port: int) -> None:
  words = _words()
  calls = [
    lambda: ("pow", rng.randint(2, 9), rng.randint(0, 9)),  # XML-RPC ints are 32-bit
    lambda: ("add", rng.randint(-(10**6), 10**6), rng.randint(-(10**6), 10**6)),
    lambda: ("add", " ".join(rng.sample(words, 2)), " " + rng.choice(words)),
    lambda: ("sort", [rng.randint(0, 999) for _ in range(rng.randint(1, 30))]),
    lambda: ("upper", " ".join(rng.sample(words, rng.randint(1, 8)))),
    lambda: ("word_count", rng.choice(_docstrings())),
    lambda: ("stats", [round(rng.gauss(0, 10), 3) for _ in range(rng.randint(1, 20))]),
    lambda: ("docstring", rng.randrange(10_000)),
    lambda: ("system.listMethods",),
  ]
  chosen = [rng.choice(calls)() for _ in range(rng.randint(1, 3))]
  proxy = xmlrpc.client.ServerProxy(f"http://{_LOOPBACK}:{port}/RPC2", allow_none=True)
  try:
    if len(chosen) > 1 and rng.random() < 0.3:
      multicall = xmlrpc.client.MultiCall(proxy)
      for name, *args in chosen:
        getattr(multicall, name)(*args)
      list(multicall())
    else:
      for name, *args in chosen:
        getattr(proxy, name)(*args)
  finally:
    proxy("close")()


def _dns_client(rng: random.Random, port: int) -> list[tuple[int, bytes]]:
  """Sends 1 to 3 queries from one UDP socket to the server at `port`; returns the recorded datagrams (side, bytes)."""
  types = (dpkt.dns.DNS_A, dpkt.dns.DNS_AAAA, dpkt.dns.DNS_MX, dpkt.dns.DNS_TXT)
  zone = rng.choice(("example.com", "example.org", "example.net", "example.com", "invalid"))
  prefix = rng.choice(("", "", "www.", "mail.", "docs.", "api."))
  name = f"{prefix}{rng.choice(_words())}.{zone}"
  first = rng.choices(types, weights=(6, 2, 1, 1))[0]
  queries = [first] + ([dpkt.dns.DNS_AAAA] if first == dpkt.dns.DNS_A and rng.random() < 0.5 else [])
  if rng.random() < 0.2:
    queries.append(rng.choice(types))
  datagrams = []
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
    sock.bind((_LOOPBACK, 0))
    sock.settimeout(_IO_TIMEOUT)
    for qtype in queries:
      query = dpkt.dns.DNS(id=rng.getrandbits(16), qd=[dpkt.dns.DNS.Q(name=name, type=qtype)], an=[], ns=[], ar=[])
      query.rd = 1
      data = bytes(query)
      sock.sendto(data, (_LOOPBACK, port))
      datagrams.append((0, data))
      answer, _ = sock.recvfrom(65535)
      datagrams.append((1, answer))
  return datagrams


# ------------------------------------------------------------------------------------------------ packet assembly


def _ipv4(ip_id: int, transport: dpkt.Packet, proto: int) -> bytes:
  ip = dpkt.ip.IP(src=_LOOPBACK_BYTES, dst=_LOOPBACK_BYTES, p=proto, ttl=64, id=ip_id, df=1, data=transport)
  return bytes(ip)  # dpkt fills in the total length and the IP and TCP/UDP checksums


def _tcp_packets(events: list[tuple[int, bytes]], rng: random.Random, ports: tuple[int, int]) -> list[bytes]:
  """The IPv4/TCP packets of a recorded conversation (see the module docstring): handshake, MSS-sized data segments
  each answered by a pure ACK, and each side's FIN/ACK answered by an ACK. `ports` = (client port, server port)."""
  isn = [rng.getrandbits(32), rng.getrandbits(32)]
  ip_ids = [rng.getrandbits(16), rng.getrandbits(16)]
  nxt = [isn[0] + 1, isn[1] + 1]
  windows = (CLIENT_WINDOW, SERVER_WINDOW)
  packets = []

  def send(side: int, flags: int, seq: int, ack: int, payload: bytes = b"") -> None:
    sport, dport = ports if side == 0 else ports[::-1]
    tcp = dpkt.tcp.TCP(
      sport=sport, dport=dport, seq=seq % 2**32, ack=ack % 2**32, flags=flags, win=windows[side], data=payload
    )
    packets.append(_ipv4(ip_ids[side], tcp, dpkt.ip.IP_PROTO_TCP))
    ip_ids[side] = (ip_ids[side] + 1) & 0xFFFF

  ack_flag, psh, fin = dpkt.tcp.TH_ACK, dpkt.tcp.TH_PUSH, dpkt.tcp.TH_FIN
  send(0, dpkt.tcp.TH_SYN, isn[0], 0)
  send(1, dpkt.tcp.TH_SYN | ack_flag, isn[1], nxt[0])
  send(0, ack_flag, nxt[0], nxt[1])
  closed = [False, False]
  for side, data in list(events) + [(0, b""), (1, b"")]:  # any side the proxy did not see close, closes at the end
    other = 1 - side
    if closed[side]:
      continue
    if data:
      for start in range(0, len(data), MSS):
        segment = data[start : start + MSS]
        send(side, ack_flag | (psh if start + MSS >= len(data) else 0), nxt[side], nxt[other], segment)
        nxt[side] += len(segment)
        send(other, ack_flag, nxt[other], nxt[side])
    else:
      send(side, fin | ack_flag, nxt[side], nxt[other])
      nxt[side] += 1
      closed[side] = True
      send(other, ack_flag, nxt[other], nxt[side])
  return packets


def _udp_packets(datagrams: list[tuple[int, bytes]], rng: random.Random, ports: tuple[int, int]) -> list[bytes]:
  ip_ids = [rng.getrandbits(16), rng.getrandbits(16)]
  packets = []
  for side, data in datagrams:
    sport, dport = ports if side == 0 else ports[::-1]
    udp = dpkt.udp.UDP(sport=sport, dport=dport, ulen=8 + len(data), data=data)
    packets.append(_ipv4(ip_ids[side], udp, dpkt.ip.IP_PROTO_UDP))
    ip_ids[side] = (ip_ids[side] + 1) & 0xFFFF
  return packets


# ------------------------------------------------------------------------------------------------ generation


@contextlib.contextmanager
def _application(app: str):
  """Starts the server of `app` (and its recording proxy, for TCP) and yields a function rng -> recorded events;
  stops everything on exit."""
  with contextlib.ExitStack() as stack:
    tls = app in TLS_APPLICATIONS
    base = app[:-1] if tls else app  # https -> http, smtps -> smtp, pop3s -> pop3
    server_alpn = {"https": ("http/1.1",), "pop3s": ("pop3",)}.get(app, ())
    if base == "dns":
      dns = _Running(_DNSServer())
      stack.callback(dns.close)
      yield lambda rng: _dns_client(rng, dns.port)
      return
    if base == "xmlrpc":
      server = _XMLRPCServer((_LOOPBACK, 0), _KeepAliveXMLRPCHandler, logRequests=False, allow_none=True)
      _register_xmlrpc_functions(server)
      client = _xmlrpc_client
    else:
      handler = {
        "http": _QuietHTTPHandler,
        "smtp": _SMTPAuthHandler if tls else _SMTPHandler,
        "pop3": _POP3Handler,
        "ftp": _FTPHandler,
      }[base]
      if tls:
        handler = _with_tls(handler, _server_context(server_alpn))
      server = _TCPServer(handler)
      client = {"http": _http_client, "smtp": _smtp_client, "pop3": _pop3_client, "ftp": _ftp_client}[base]
      if tls:
        client_context = _client_context(server_alpn, post_handshake_auth=app == "https")
        client = functools.partial(client, context=client_context)
    running = _Running(server)
    stack.callback(running.close)
    proxy = _RecordingProxy(running.port)
    stack.callback(proxy.close)

    def record(rng: random.Random) -> list[tuple[int, bytes]]:
      client(rng, proxy.port)
      events = proxy.next_conversation()
      if server.errors:
        raise RuntimeError(f"the loopback {app} server failed: {server.errors[0]!r}") from server.errors[0]
      return events

    yield record


def generate_flows(flows_per_app: int, seed: int) -> list[tuple[str, list[bytes]]]:
  """Makes `flows_per_app` flows of each application of APPLICATIONS over loopback (see the module docstring).

  Returns [(application, packets)] grouped by application in APPLICATIONS order; packets are raw IPv4 packets
  (bytes, IP header first), in time order, with addresses 127.0.0.1 and distinct (client port, well-known server
  port) pairs per application. Content is drawn from random.Random(f"{seed}/{application}"). Servers listen on
  OS-chosen ports and are stopped (threads joined, sockets closed) before it returns.
  """
  if not 0 <= flows_per_app <= len(_EPHEMERAL_PORTS):
    raise ValueError(f"flows_per_app={flows_per_app}; allowed: 0..{len(_EPHEMERAL_PORTS)}")
  flows = []
  for app in APPLICATIONS:
    rng = random.Random(f"{seed}/{app}")
    client_ports = rng.sample(_EPHEMERAL_PORTS, flows_per_app)
    with _application(app) as record:
      for client_port in client_ports:
        events = record(rng)
        ports = (client_port, SERVER_PORTS[app])
        packets = _udp_packets(events, rng, ports) if app == "dns" else _tcp_packets(events, rng, ports)
        flows.append((app, packets))
  return flows


# ------------------------------------------------------------------------------------------------ pcap I/O


def write_pcap(path: str | os.PathLike, flows: Iterable[Sequence[bytes] | tuple[str, Sequence[bytes]]]) -> None:
  """Writes flows (lists of raw IPv4 packets, or (application, packets) pairs as `generate_flows` returns) one after
  another to a libpcap file of link type raw IP (LINKTYPE_RAW = 101, the file value of DLT_RAW). Timestamps are
  synthetic: flow k starts at 2024-01-01T00:00:00Z + k seconds, its packets 100 microseconds apart."""
  start = 1_704_067_200.0
  with open(path, "wb") as f:
    writer = dpkt.pcap.Writer(f, snaplen=65535, linktype=LINKTYPE_RAW)
    for k, flow in enumerate(flows):
      if isinstance(flow, tuple) and len(flow) == 2 and isinstance(flow[0], str):
        flow = flow[1]
      for i, packet in enumerate(flow):
        writer.writepkt(packet, ts=start + k + i * 1e-4)


class _NotACapture(Exception):
  pass


_PCAP_MAGIC_ENDIAN = {  # microsecond and nanosecond libpcap magics, as they appear in the file
  b"\xa1\xb2\xc3\xd4": ">",
  b"\xd4\xc3\xb2\xa1": "<",
  b"\xa1\xb2\x3c\x4d": ">",
  b"\x4d\x3c\xb2\xa1": "<",
}
_PCAPNG_MAGIC = b"\x0a\x0d\x0d\x0a"
_MAX_RECORD = 1 << 26  # larger packet records or blocks are taken as corruption


def _pcap_frames(f):
  """(link type, frame) of each record of a libpcap file; the file header is parsed by dpkt."""
  magic = f.read(4)
  f.seek(0)
  reader = dpkt.pcap.Reader(f)  # reads the 24-byte file header
  linktype = reader.datalink()
  header_class = dpkt.pcap.LEPktHdr if _PCAP_MAGIC_ENDIAN[magic] == "<" else dpkt.pcap.PktHdr
  count = 0
  while True:
    header = f.read(16)
    if not header:
      return
    if len(header) < 16:
      raise _NotACapture(f"truncated record header after {count} packets")
    caplen = header_class(header).caplen
    if caplen > _MAX_RECORD:
      raise _NotACapture(f"implausible record length {caplen} after {count} packets")
    frame = f.read(caplen)
    if len(frame) < caplen:
      raise _NotACapture(f"truncated packet record after {count} packets ({len(frame)} of {caplen} bytes)")
    count += 1
    yield linktype, frame


def _pcapng_frames(f):
  """(link type, frame) of each packet block (enhanced, simple, obsolete) of a pcapng file; blocks parsed by dpkt."""
  pcapng = dpkt.pcapng
  endian, linktypes, count = None, [], 0
  while True:
    head = f.read(8)
    if not head:
      return
    if len(head) < 8:
      raise _NotACapture(f"truncated block header after {count} packets")
    if head[:4] == _PCAPNG_MAGIC:  # section header block: byte order, then a new list of interfaces
      bom = f.read(4)
      if len(bom) < 4:
        raise _NotACapture("truncated section header block")
      if bom == b"\x4d\x3c\x2b\x1a":
        endian = "<"
      elif bom == b"\x1a\x2b\x3c\x4d":
        endian = ">"
      else:
        raise _NotACapture("unknown byte-order magic in the section header block")
      length = struct.unpack(endian + "I", head[4:])[0]
      if not 28 <= length <= _MAX_RECORD or length % 4:
        raise _NotACapture(f"invalid section header block length {length}")
      block = head + bom + f.read(length - 12)
      if len(block) < length:
        raise _NotACapture("truncated section header block")
      shb = (pcapng.SectionHeaderBlockLE if endian == "<" else pcapng.SectionHeaderBlock)(block)
      if shb.v_major != 1:
        raise _NotACapture(f"unsupported pcapng version {shb.v_major}.{shb.v_minor}")
      linktypes = []
      continue
    if endian is None:
      raise _NotACapture("no section header block at the start")
    kind, length = struct.unpack(endian + "II", head)
    if not 12 <= length <= _MAX_RECORD or length % 4:
      raise _NotACapture(f"invalid block length {length} after {count} packets")
    block = head + f.read(length - 8)
    if len(block) < length:
      raise _NotACapture(f"truncated block after {count} packets ({len(block)} of {length} bytes)")
    little = endian == "<"
    if kind == pcapng.PCAPNG_BT_IDB:
      interface = (pcapng.InterfaceDescriptionBlockLE if little else pcapng.InterfaceDescriptionBlock)(block)
      linktypes.append(interface.linktype)
    elif kind in (pcapng.PCAPNG_BT_EPB, pcapng.PCAPNG_BT_PB):
      if kind == pcapng.PCAPNG_BT_EPB:
        packet = (pcapng.EnhancedPacketBlockLE if little else pcapng.EnhancedPacketBlock)(block)
      else:
        packet = (pcapng.PacketBlockLE if little else pcapng.PacketBlock)(block)
      if packet.iface_id >= len(linktypes):
        raise _NotACapture(f"packet of undeclared interface {packet.iface_id}")
      count += 1
      yield linktypes[packet.iface_id], packet.pkt_data
    elif kind == 3:  # simple packet block: interface 0, original length, data
      if not linktypes:
        raise _NotACapture("packet of undeclared interface 0")
      original = struct.unpack(endian + "I", block[8:12])[0]
      count += 1
      yield linktypes[0], block[12 : 12 + min(original, length - 16)]


_ETHERTYPE_IPV4 = 0x0800
_VLAN_ETHERTYPES = (0x8100, 0x88A8, 0x9100)
_RAW_LINKTYPES = (12, 14, LINKTYPE_RAW, 228)  # DLT_RAW (Linux / OpenBSD values), LINKTYPE_RAW, LINKTYPE_IPV4
SUPPORTED_LINKTYPES = (0, 1, 12, 14, 101, 108, 113, 228, 276)


def _ipv4_of_frame(linktype: int, frame: bytes) -> bytes | None:
  """The IPv4 packet in a link-layer frame (None for other network protocols)."""
  if linktype == 1:  # Ethernet, with any 802.1Q / 802.1ad tags
    offset = 12
    while len(frame) >= offset + 2 and int.from_bytes(frame[offset : offset + 2], "big") in _VLAN_ETHERTYPES:
      offset += 4
    if int.from_bytes(frame[offset : offset + 2], "big") != _ETHERTYPE_IPV4:
      return None
    packet = frame[offset + 2 :]
  elif linktype in _RAW_LINKTYPES:
    packet = frame
  elif linktype == 113:  # Linux cooked v1: protocol at bytes 14-15, 16-byte header
    packet = frame[16:] if frame[14:16] == b"\x08\x00" else None
  elif linktype == 276:  # Linux cooked v2: protocol at bytes 0-1, 20-byte header
    packet = frame[20:] if frame[:2] == b"\x08\x00" else None
  elif linktype in (0, 108):  # BSD loopback: a 4-byte address family (AF_INET = 2), host / network byte order
    packet = frame[4:] if frame[:4] in (b"\x02\x00\x00\x00", b"\x00\x00\x00\x02") else None
  else:
    return None
  if not packet or len(packet) < 20 or packet[0] >> 4 != 4:
    return None
  return packet


def read_pcap(path: str | os.PathLike) -> list[list[bytes]]:
  """The IPv4 TCP/UDP flows of a pcap or pcapng capture: one list of raw IPv4 packets (bytes, IP header first, link
  layer and Ethernet padding removed, addresses as captured) per bidirectional 5-tuple (protocol, sorted endpoints),
  in order of first appearance, packets in file order. Link types: Ethernet (1), raw IP (12, 14, 101, 228), Linux
  cooked v1 / v2 (113, 276), BSD loopback (0, 108); IPv6, non-IP frames, other protocols and non-first IP fragments
  are skipped.

  Raises ValueError: the file is not a readable pcap/pcapng capture (one line, with the reason), or it holds no IPv4
  TCP/UDP flow.
  """
  flows: dict[tuple, list[bytes]] = {}
  frames = unsupported = 0
  try:
    with open(path, "rb") as f:
      magic = f.read(4)
      f.seek(0)
      if not magic:
        raise _NotACapture("empty file")
      if magic == _PCAPNG_MAGIC:
        records = _pcapng_frames(f)
      elif magic in _PCAP_MAGIC_ENDIAN:
        records = _pcap_frames(f)
      elif len(magic) < 4:
        raise _NotACapture(f"{len(magic)}-byte file")
      else:
        raise _NotACapture(f"unknown magic number 0x{magic.hex()}")
      for linktype, frame in records:
        frames += 1
        if linktype not in SUPPORTED_LINKTYPES:
          unsupported += 1
          continue
        packet = _ipv4_of_frame(linktype, frame)
        if packet is None:
          continue
        try:
          ip = dpkt.ip.IP(packet)
        except (dpkt.UnpackError, struct.error):
          continue
        if not isinstance(ip.data, (dpkt.tcp.TCP, dpkt.udp.UDP)):
          continue
        if ip.len and ip.len <= len(packet):
          packet = packet[: ip.len]
        key = (ip.p, *sorted([(ip.src, ip.data.sport), (ip.dst, ip.data.dport)]))
        flows.setdefault(key, []).append(packet)
  except _NotACapture as e:
    raise ValueError(_NOT_A_CAPTURE.format(path=path, reason=e)) from None
  except (dpkt.UnpackError, ValueError, struct.error) as e:  # from dpkt's header parsers
    reason = " ".join(str(e).split()) or type(e).__name__
    raise ValueError(_NOT_A_CAPTURE.format(path=path, reason=reason)) from None
  if not flows:
    note = f", {unsupported} of an unsupported link type" if unsupported else ""
    raise ValueError(f"{path}: no IPv4 TCP/UDP flows in the capture ({frames} packets{note})")
  return list(flows.values())


# ------------------------------------------------------------------------------------------------ model input


def _anonymised_parts(packet: bytes) -> tuple[bytes, bytes]:
  """(IP + transport header, payload) of a raw IPv4 packet, with addresses, ports and checksums zeroed."""
  if len(packet) < 20 or packet[0] >> 4 != 4:
    raise ValueError(f"not an IPv4 packet: {packet[:20].hex()}")
  ihl = (packet[0] & 0x0F) * 4
  total = int.from_bytes(packet[2:4], "big")
  end = min(total, len(packet)) if total else len(packet)
  first_fragment = int.from_bytes(packet[6:8], "big") & 0x1FFF == 0
  proto, transport = packet[9], 0
  if first_fragment and proto == dpkt.ip.IP_PROTO_TCP and end >= ihl + 20:
    transport = min(max((packet[ihl + 12] >> 4) * 4, 20), end - ihl)
  elif first_fragment and proto == dpkt.ip.IP_PROTO_UDP and end >= ihl + 8:
    transport = 8
  header = bytearray(packet[: ihl + transport])
  header[10:20] = bytes(10)  # IP header checksum, source and destination addresses
  if transport:
    header[ihl : ihl + 4] = bytes(4)  # source and destination ports
    checksum = ihl + (16 if proto == dpkt.ip.IP_PROTO_TCP else 6)
    header[checksum : checksum + 2] = bytes(2)
  return bytes(header), packet[ihl + transport : end]


def flow_bytes(
  packets: Sequence[bytes],
  packets_per_flow: int = PACKETS_PER_FLOW,
  header_bytes: int = HEADER_BYTES,
  payload_bytes: int = PAYLOAD_BYTES,
) -> np.ndarray:
  """NetMamba's input of a flow: uint8 [packets_per_flow, header_bytes + payload_bytes].

  Row i is packet i: its IP + TCP/UDP header cut / zero-padded to `header_bytes`, then its payload cut / zero-padded
  to `payload_bytes`; the IP addresses, the ports and the IP and TCP/UDP checksums are zeroed. Rows past the flow's
  last packet are zeros. `packets` are raw IPv4 packets (as from `read_pcap` or `generate_flows`).
  """
  out = np.zeros((packets_per_flow, header_bytes + payload_bytes), np.uint8)
  for row, packet in enumerate(packets[:packets_per_flow]):
    header, payload = _anonymised_parts(packet)
    header, payload = header[:header_bytes], payload[:payload_bytes]
    out[row, : len(header)] = np.frombuffer(header, np.uint8)
    out[row, header_bytes : header_bytes + len(payload)] = np.frombuffer(payload, np.uint8)
  return out


# ------------------------------------------------------------------------------------------------ TFDS builder


class LoopbackTraffic(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Loopback network flows of 9 applications (3 over TLS) as NetMamba inputs: `packets` uint8 [5, 320] (per packet
  80 header + 240 payload bytes, addresses and ports zeroed), `label` the application (see zoo.data.traffic)."""

  name = "loopback_traffic"
  # No checksums file: there is nothing to download (TFDS would otherwise locate one next to this module).
  code_path = None
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "9 applications over loopback, proxy-recorded and assembled; pcap round trip; 80/20 split."}
  FLOWS_PER_APP = 200
  SEED = 0
  TEST_FRACTION = 0.2
  FORMAT_INFO = {"packet_shape": (PACKETS_PER_FLOW, HEADER_BYTES + PAYLOAD_BYTES)}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.__doc__,
      features=tfds.features.FeaturesDict(
        {
          "packets": tfds.features.Tensor(shape=(PACKETS_PER_FLOW, HEADER_BYTES + PAYLOAD_BYTES), dtype=np.uint8),
          "label": tfds.features.ClassLabel(names=APPLICATIONS),
        }
      ),
      supervised_keys=("packets", "label"),
    )

  def _split_generators(self, dl_manager):
    if getattr(self, "_split_records", None) is None:
      self._split_records = self._make_records(dl_manager)
    return {split: self._generate_examples(records) for split, records in self._split_records.items()}

  def _make_records(self, dl_manager) -> dict[str, list[tuple[str, np.ndarray, str]]]:
    """Generates the flows once, writes one pcap per application, reads them back and splits them per application
    (TEST_FRACTION of each in 'test', by a permutation seeded with SEED)."""
    flows = generate_flows(self.FLOWS_PER_APP, self.SEED)
    with contextlib.ExitStack() as stack:
      directory = None
      with contextlib.suppress(AttributeError, TypeError, OSError):
        candidate = os.fspath(dl_manager.download_dir)
        if "://" not in candidate:
          directory = os.path.join(candidate, self.name)
          os.makedirs(directory, exist_ok=True)
      if directory is None or not os.access(directory, os.W_OK):
        directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="loopback_traffic_"))
      order = np.random.default_rng(self.SEED)
      records = {"train": [], "test": []}
      for app in APPLICATIONS:
        path = os.path.join(directory, f"{app}.pcap")
        write_pcap(path, [packets for name, packets in flows if name == app])
        arrays = [flow_bytes(packets) for packets in read_pcap(path)]
        if len(arrays) != self.FLOWS_PER_APP:
          raise RuntimeError(f"{path}: {len(arrays)} flows read back, {self.FLOWS_PER_APP} written")
        test = set(order.permutation(len(arrays))[: round(self.TEST_FRACTION * len(arrays))].tolist())
        for i, array in enumerate(arrays):
          records["test" if i in test else "train"].append((f"{app}-{i:05d}", array, app))
    return records

  def _generate_examples(self, records):
    for key, packets, app in records:
      yield key, {"packets": packets, "label": app}
