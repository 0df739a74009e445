"""zoo.data.traffic: loopback flows (handshake, seq/ack, content, TLS), pcap/pcapng I/O, NetMamba layout, builder."""

import email
import email.policy
import os
import re
import struct
import sysconfig
import threading
import xmlrpc.client

import dpkt
import numpy as np
import pytest

from zoo.data import traffic

SEED = 7
FLOWS_PER_APP = 4
_SUFFIX = "; allowed: a libpcap .pcap or .pcapng file of IPv4 traffic"


def _fds() -> int:
  return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def generated():
  """The flows of one `generate_flows` call, with the thread and file-descriptor counts around it."""
  threads, fds = threading.active_count(), _fds()
  flows = traffic.generate_flows(FLOWS_PER_APP, SEED)
  return flows, (threads, fds), (threading.active_count(), _fds())


def _by_app(flows, app):
  return [packets for name, packets in flows if name == app]


def _tcp_streams(packets):
  """Checks the handshake, seq/ack numbers and the close of a TCP flow; returns (client->server, server->client)."""
  ips = [dpkt.ip.IP(p) for p in packets]
  tcps = [ip.data for ip in ips]
  assert all(isinstance(t, dpkt.tcp.TCP) for t in tcps)
  syn, syn_ack, ack = tcps[:3]
  assert syn.flags == dpkt.tcp.TH_SYN and not syn.data
  assert syn_ack.flags == dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK and syn_ack.ack == (syn.seq + 1) % 2**32
  assert ack.flags == dpkt.tcp.TH_ACK and ack.seq == syn_ack.ack and ack.ack == (syn_ack.seq + 1) % 2**32
  client = syn.sport
  following = {0: syn.seq + 1, 1: syn_ack.seq + 1}  # the next sequence number of each side
  streams, fins = {0: [], 1: []}, {0: 0, 1: 0}
  for tcp in tcps[3:]:
    side = 0 if tcp.sport == client else 1
    assert tcp.off == 5 and tcp.flags & dpkt.tcp.TH_ACK and not tcp.flags & (dpkt.tcp.TH_SYN | dpkt.tcp.TH_RST)
    assert tcp.seq == following[side] % 2**32  # consistent with the payload lengths sent so far
    assert tcp.ack == following[1 - side] % 2**32  # everything the other side sent is acknowledged
    assert len(tcp.data) <= traffic.MSS
    if tcp.data:
      assert not fins[side]
    streams[side].append(tcp.data)
    fin = 1 if tcp.flags & dpkt.tcp.TH_FIN else 0
    following[side] += len(tcp.data) + fin
    fins[side] += fin
  assert fins == {0: 1, 1: 1}
  assert tcps[-1].flags == dpkt.tcp.TH_ACK and not tcps[-1].data  # the last FIN is acknowledged
  return b"".join(streams[0]), b"".join(streams[1])


def test_flows_of_every_application_parse_as_ipv4_and_leave_nothing_running(generated):
  flows, before, after = generated
  assert [app for app, _ in flows] == [app for app in traffic.APPLICATIONS for _ in range(FLOWS_PER_APP)]
  assert len(traffic.APPLICATIONS) >= 6 and len(traffic.TLS_APPLICATIONS) >= 3
  tuples = set()
  for app, packets in flows:
    for packet in packets:
      ip = dpkt.ip.IP(packet)
      assert ip.v == 4 and ip.hl == 5 and ip.len == len(packet) and ip.df and ip.ttl == 64
      assert dpkt.in_cksum(packet[:20]) == 0  # a valid header checksum
      assert ip.src == ip.dst == bytes([127, 0, 0, 1])
      assert isinstance(ip.data, dpkt.udp.UDP if app == "dns" else dpkt.tcp.TCP)
    first = dpkt.ip.IP(packets[0]).data
    assert first.dport == traffic.SERVER_PORTS[app] and 32768 <= first.sport < 61000
    tuples.add((app, first.sport))
  assert len(tuples) == len(flows)  # distinct 5-tuples per application
  assert after == before  # server, proxy and handler threads joined; sockets closed


def test_tcp_flows_have_handshake_consistent_seq_ack_and_close(generated):
  flows, _, _ = generated
  for app, packets in flows:
    if app != "dns":
      client_to_server, server_to_client = _tcp_streams(packets)
      assert client_to_server and server_to_client


def test_http_bodies_are_the_served_files(generated):
  flows, _, _ = generated
  root = sysconfig.get_paths()["stdlib"]
  served = 0
  for packets in _by_app(flows, "http"):
    request, response = _tcp_streams(packets)
    method, path, version = request.split(b"\r\n", 1)[0].decode().split(" ")
    assert version == "HTTP/1.1" and b"\r\nUser-Agent: " in request
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    local = os.path.join(root, path.lstrip("/"))
    if status == 200 and os.path.isfile(local):
      with open(local, "rb") as f:
        expected = f.read()
      assert body == (b"" if method == "HEAD" else expected)
      assert f"Content-Length: {len(expected)}".encode() in head
      served += method == "GET"
    else:
      assert status in (200, 404) and (status == 404) == (not os.path.exists(local))
  assert served >= 1


def test_ftp_smtp_pop3_xmlrpc_dns_content_is_what_was_exchanged(generated):
  flows, _, _ = generated
  root = sysconfig.get_paths()["stdlib"]
  for packets in _by_app(flows, "ftp"):
    commands, replies = _tcp_streams(packets)
    assert replies.startswith(b"220 ") and commands.endswith(b"QUIT\r\n") and replies.endswith(b"221 Goodbye.\r\n")
    retrievals = re.findall(rb"150 Opening BINARY mode data connection for (\S+) \((\d+) bytes\)", replies)
    assert len(retrievals) == commands.count(b"RETR ") >= 1
    for path, size in retrievals:
      assert os.path.getsize(os.path.join(root, path.decode().lstrip("/"))) == int(size)
  docstrings = set(traffic._docstrings())
  for packets in _by_app(flows, "smtp"):
    commands, replies = _tcp_streams(packets)
    assert replies.startswith(b"220 ") and commands.startswith(b"ehlo ") and b"\r\nmail FROM:<" in commands
    mail = commands.partition(b"\r\ndata\r\n")[2].rpartition(b"\r\n.\r\n")[0].replace(b"\r\n..", b"\r\n.")
    body = email.message_from_bytes(mail, policy=email.policy.default).get_content().replace("\r\n", "\n")
    assert any(body.startswith(doc) for doc in docstrings)
  for packets in _by_app(flows, "pop3"):
    commands, replies = _tcp_streams(packets)
    user = re.search(rb"USER (\S+)\r\n", commands).group(1).decode()
    mailbox = traffic._mailbox(user)
    numbers = [int(n) for n in re.findall(rb"RETR (\d+)\r\n", commands)]
    for number in numbers:
      mail = mailbox[number - 1]
      stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in mail.split(b"\r\n"))
      assert f"+OK {len(mail)} octets\r\n".encode() + stuffed + b"\r\n.\r\n" in replies
  for packets in _by_app(flows, "xmlrpc"):
    requests, responses = _tcp_streams(packets)
    assert requests.startswith(b"POST /RPC2 HTTP/1.1\r\n")
    bodies = [part.split(b"\r\n\r\n", 1)[1] for part in responses.split(b"HTTP/1.1 200 OK\r\n")[1:]]
    assert len(bodies) == requests.count(b"POST /RPC2 ") >= 1
    for body in bodies:
      xmlrpc.client.loads(body)  # a Fault would raise
  for packets in _by_app(flows, "dns"):
    messages = [dpkt.dns.DNS(dpkt.ip.IP(p).data.data) for p in packets]
    assert len(messages) % 2 == 0 and len(messages) >= 2
    for query, answer in zip(messages[::2], messages[1::2]):
      assert query.qr == dpkt.dns.DNS_Q and answer.qr == dpkt.dns.DNS_R and answer.id == query.id
      assert [(q.name, q.type) for q in answer.qd] == [(q.name, q.type) for q in query.qd]
      invalid = query.qd[0].name.endswith(".invalid")
      assert answer.rcode == (dpkt.dns.DNS_RCODE_NXDOMAIN if invalid else dpkt.dns.DNS_RCODE_NOERR)
      assert bool(answer.an) != invalid


def test_tls_flows_carry_only_tls_records(generated):
  flows, _, _ = generated
  plaintext = (b"HTTP/1.", b"GET ", b"HEAD ", b"User-Agent", b"EHLO", b"ehlo", b"MAIL FROM", b"+OK", b"USER ", b"220 ")
  for app in traffic.TLS_APPLICATIONS:
    for packets in _by_app(flows, app):
      client_to_server, server_to_client = _tcp_streams(packets)
      for stream in (client_to_server, server_to_client):
        assert stream[:3] == b"\x16\x03\x01" or stream[:3] == b"\x16\x03\x03"  # a TLS handshake record first
        assert not any(marker in stream for marker in plaintext)
        offset, types = 0, set()
        while offset < len(stream):  # the stream is a sequence of whole TLS records
          kind, length = stream[offset], struct.unpack(">H", stream[offset + 3 : offset + 5])[0]
          types.add(kind)
          offset += 5 + length
        assert offset == len(stream) and types <= {20, 21, 22, 23} and 23 in types  # application data is encrypted


def test_content_is_reproducible_for_a_seed(generated):
  flows, _, _ = generated
  again = traffic.generate_flows(FLOWS_PER_APP, SEED)
  assert _by_app(again, "dns") == _by_app(flows, "dns")  # datagrams: byte-identical
  for app in ("smtp", "pop3", "ftp"):
    for first, second in zip(_by_app(flows, app), _by_app(again, app)):
      assert _tcp_streams(first)[0] == _tcp_streams(second)[0]


def test_pcap_round_trip_keeps_the_flows(generated, tmp_path):
  flows, _, _ = generated
  path = tmp_path / "all.pcap"
  traffic.write_pcap(path, flows)
  with open(path, "rb") as f:
    assert dpkt.pcap.Reader(f).datalink() == traffic.LINKTYPE_RAW
  assert traffic.read_pcap(path) == [list(packets) for _, packets in flows]


def _ip_packet(src="10.1.2.3", dst="10.4.5.6", sport=51000, dport=443, payload=b"x", udp=False, opts=b""):
  transport = (
    dpkt.udp.UDP(sport=sport, dport=dport, ulen=8 + len(payload), data=payload)
    if udp
    else dpkt.tcp.TCP(sport=sport, dport=dport, seq=1000, ack=2000, flags=dpkt.tcp.TH_ACK, opts=opts, data=payload)
  )
  if not udp:
    transport.off = 5 + len(opts) // 4
  ip = dpkt.ip.IP(
    src=bytes(map(int, src.split("."))), dst=bytes(map(int, dst.split("."))), p=17 if udp else 6, id=77, data=transport
  )
  return bytes(ip)


def test_read_pcapng_ethernet_and_linux_cooked_captures(tmp_path):
  tcp_a = _ip_packet(payload=b"hello")
  tcp_b = _ip_packet(src="10.4.5.6", dst="10.1.2.3", sport=443, dport=51000, payload=b"world" * 50)
  udp = _ip_packet(src="192.0.2.1", dst="192.0.2.2", sport=5353, dport=53, payload=b"q", udp=True)
  ethernet = lambda ip, kind=b"\x08\x00": (b"\x02" * 6 + b"\x04" * 6 + kind + ip).ljust(60, b"\x00")  # padded
  arp = b"\xff" * 6 + b"\x04" * 6 + b"\x08\x06" + b"\x00" * 28
  ipv6 = ethernet(b"\x60" + b"\x00" * 39, b"\x86\xdd")
  vlan = b"\x02" * 6 + b"\x04" * 6 + b"\x81\x00\x00\x05\x08\x00" + tcp_a
  path = tmp_path / "eth.pcapng"
  with open(path, "wb") as f:
    writer = dpkt.pcapng.Writer(f, linktype=dpkt.pcap.DLT_EN10MB)
    for frame in (arp, ethernet(tcp_a), ipv6, ethernet(udp), ethernet(tcp_b), vlan):
      writer.writepkt(frame, ts=1.0)
  assert traffic.read_pcap(path) == [[tcp_a, tcp_b, tcp_a], [udp]]  # Ethernet padding removed, IPv6 / ARP skipped

  sll = lambda ip: struct.pack(">HHH8sH", 0, 1, 6, b"\x02" * 6, 0x0800) + ip
  path = tmp_path / "sll.pcap"
  with open(path, "wb") as f:
    writer = dpkt.pcap.Writer(f, linktype=dpkt.pcap.DLT_LINUX_SLL)
    for ip in (udp, tcp_b, tcp_a):
      writer.writepkt(sll(ip), ts=1.0)
  assert traffic.read_pcap(path) == [[udp], [tcp_b, tcp_a]]

  path = tmp_path / "arp.pcap"
  with open(path, "wb") as f:
    dpkt.pcap.Writer(f, linktype=dpkt.pcap.DLT_EN10MB).writepkt(arp, ts=1.0)
  with pytest.raises(ValueError, match=r"arp\.pcap: no IPv4 TCP/UDP flows in the capture \(1 packets\)"):
    traffic.read_pcap(path)


def test_unreadable_files_raise_one_line_value_errors(tmp_path):
  good = tmp_path / "good.pcap"
  traffic.write_pcap(good, [[_ip_packet(payload=b"a" * 100), _ip_packet(payload=b"b")]])
  data = good.read_bytes()
  with open(tmp_path / "good.pcapng", "wb") as f:
    writer = dpkt.pcapng.Writer(f, linktype=traffic.LINKTYPE_RAW)
    writer.writepkt(_ip_packet(payload=b"a" * 100), ts=1.0)
  data_ng = (tmp_path / "good.pcapng").read_bytes()
  bad_byte_order = "unknown byte-order magic in the section header block"
  cases = {
    "garbage.pcap": (b"this is not a capture at all\n" * 4, "unknown magic number 0x74686973"),
    "empty.pcap": (b"", "empty file"),
    "short.pcap": (data[:10], "got 10, 24 needed at least"),
    "cut.pcap": (data[:-30], "truncated packet record after 1 packets (11 of 41 bytes)"),
    "cutheader.pcap": (data[: 24 + 16 + 140 + 5], "truncated record header after 1 packets"),
    "short.pcapng": (data_ng[:11], "truncated section header block"),
    "endian.pcapng": (data_ng[:8] + b"\x01\x02\x03\x04" + data_ng[12:], bad_byte_order),
    "cut.pcapng": (data_ng[:-10], "truncated block after 0 packets (162 of 172 bytes)"),
  }
  for name, (content, reason) in cases.items():
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as caught:
      traffic.read_pcap(path)
    assert str(caught.value) == f"{path}: not a pcap or pcapng capture ({reason}){_SUFFIX}"
    assert "\n" not in str(caught.value)


def test_flow_bytes_layout_on_hand_built_packets():
  payload = bytes(range(256)) + b"tail" * 20
  tcp = _ip_packet(payload=payload)
  udp = _ip_packet(sport=5353, dport=53, payload=b"dns-query", udp=True)
  with_options = _ip_packet(payload=b"abc", opts=b"\x01" * 12)  # 20 + 32 header bytes
  out = traffic.flow_bytes([tcp, udp, with_options])
  assert out.shape == (5, 320) and out.dtype == np.uint8

  header = bytearray(tcp[:40])
  header[10:20] = bytes(10)  # IP checksum, addresses
  header[20:24] = bytes(4)  # ports
  header[36:38] = bytes(2)  # TCP checksum
  assert bytes(out[0, :40]) == bytes(header) and not out[0, 40:80].any()
  assert out[0, 0] == 0x45 and bytes(out[0, 24:28]) == struct.pack(">I", 1000)  # version/IHL and seq kept
  assert bytes(out[0, 80:]) == payload[:240]

  header = bytearray(udp[:28])
  header[10:20], header[20:24], header[26:28] = bytes(10), bytes(4), bytes(2)
  assert bytes(out[1, :28]) == bytes(header) and not out[1, 28:80].any()
  assert bytes(out[1, 80:89]) == b"dns-query" and not out[1, 89:].any()

  assert bytes(out[2, 40:52]) == b"\x01" * 12 and bytes(out[2, 80:83]) == b"abc" and not out[2, 52:80].any()
  assert not out[3:].any()  # missing packets are zero rows

  small = traffic.flow_bytes([tcp] * 9, packets_per_flow=2, header_bytes=24, payload_bytes=8)
  assert small.shape == (2, 32) and bytes(small[1, 24:]) == payload[:8] and not small[1, 20:24].any()


def test_builder_writes_pcaps_and_builds_balanced_splits(tmp_path, monkeypatch):
  monkeypatch.setattr(traffic.LoopbackTraffic, "FLOWS_PER_APP", 5)
  builder = traffic.LoopbackTraffic(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare()
  assert traffic.LoopbackTraffic.FORMAT_INFO == {"packet_shape": (5, 320)}
  assert builder.info.features["label"].names == list(traffic.APPLICATIONS)
  pcaps = sorted(os.listdir(tmp_path / "downloads" / "loopback_traffic"))
  assert pcaps == sorted(f"{app}.pcap" for app in traffic.APPLICATIONS)
  train, test = builder.as_data_source("train"), builder.as_data_source("test")
  assert len(train) == 4 * len(traffic.APPLICATIONS) and len(test) == len(traffic.APPLICATIONS)
  record = train[0]
  assert record["packets"].shape == (5, 320) and record["packets"].dtype == np.uint8
  assert 0 <= int(record["label"]) < len(traffic.APPLICATIONS)
  labels = [int(test[i]["label"]) for i in range(len(test))]
  assert sorted(labels) == list(range(len(traffic.APPLICATIONS)))  # one test flow per application
  for i in range(len(train)):
    packets = train[i]["packets"]
    assert not packets[:, 12:20].any()  # addresses zeroed
    assert packets[0, 33] == dpkt.tcp.TH_SYN or packets[0, 9] == dpkt.ip.IP_PROTO_UDP
