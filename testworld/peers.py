#!/usr/bin/env python3
"""Unmodified TCP peers for the data plane's kernel tests (standard library only).

Servers print "listening" once they listen, then "accepted IP:PORT" for each
connection (so a test can tell that nothing was forwarded).

serve HOST PORT NAME     to each client send one JSON line
                         {"server": NAME, "peer": "ip:port"} (the server speaks
                         first), then echo until EOF, then close.
sink HOST PORT [DELAY]   read a header line "M SEED\\n", (wait DELAY seconds,)
                         then everything until
                         the client's EOF (half-close); reply with a JSON line
                         {"got": n, "sha": hex} and M bytes of the stream
                         seeded SEED, then close.
reset HOST PORT          read one byte, then close with a reset (SO_LINGER 0).
greet HOST PORT N        to each client send N bytes of the stream seeded 3,
                         then close at once, reading nothing.

connect HOST PORT [--bind-port P] [--count N] [--payload TEXT]
                         N times (the i-th from source port P+i if given):
                         connect, read the server's line, send TEXT (ping), read
                         the echo, close; one JSON line per connection
                         {"local", "peer", "server", "server_saw", "echo"}.
transfer HOST PORT N M [WAIT]
                         (after WAIT seconds connected, if given) send N bytes
                         of the stream seeded 1, shut down the write side, read
                         the reply; print JSON with both checksums checked.
expect-reset HOST PORT   send a byte, then read: prints "reset", "eof" or
                         "data" and how long it took.
read HOST PORT N         read until EOF; prints {"got": k, "ok": bool}, ok if
                         the bytes are the N of a greet server's stream.
many HOST PORT N         N concurrent connections to a `serve` server, each
                         sending its own 1 KiB and checking its echo; prints
                         {"ok": n}.
slow HOST PORT SECONDS   to a `serve` server: read its line, then send a line
                         every 0.1 s for SECONDS, checking each echo; prints
                         {"ok": bool, "lines": n, "error": ...}.
try-connect HOST PORT    prints {"result": "connected" | "refused" | ...}.
serial FILE              prints {"serial": HEX} of a PEM certificate.
aserve HOST PORT NAME    like serve, on asyncio (for thousands of connections).
stall HOST PORT N        open N TCP connections that send nothing; prints
                         {"closed": k, "max_seconds": s} once the peer has
                         closed them all (or after 30 s).
burst HOST N PORT...     N concurrent connections, each to one of the PORTs
                         (round-robin), each reading the server's line;
                         prints {"right": r, "wrong": w, "refused": f} where
                         right means the server is named "s<PORT>".
hold-verify HOST PORT N SECONDS
                         N concurrent connections to an (a)serve server, each
                         echoing its own payload, holding SECONDS, echoing a
                         second payload; prints {"ok": n, "errors": [...]}.
raw HOST PORT WHAT       send WHAT ("garbage": an HTTP request; "random": 4 KiB of
                         random bytes), then read until EOF; prints
                         {"reply_bytes": n, "seconds": s}.
tls HOST PORT CA CERT KEY DST [tls12]
                         a hand-made tunnel client: TLS 1.3 with ALPN
                         dataplane-tunnel/1 and the given client certificate
                         ("-" for none), then the preamble for DST (ip:port,
                         or "garbage", "truncated", "oversized", "version2"),
                         then "ping\\n"; prints what happened. With tls12, offer
                         TLS 1.2 only.
crowd HOST PORT IDLE SLOW SECONDS
                         IDLE connections that send nothing and SLOW ones that
                         send an HTTP request head one byte a second, each
                         re-opened when the server closes it, for SECONDS;
                         prints "crowding" once all are open, then
                         {"opened": n, "closed_by_server": k}.
hold-silent HOST PORT N SECONDS [hello]
                         N connection slots that never send (with hello: send
                         one byte of a TLS record, then nothing), each re-opened
                         when the server closes or refuses it, for SECONDS;
                         prints "holding" once all N have tried, then
                         {"attempts", "opened", "closed_by_server",
                         "failed_connects"}.
blast HOST PORT          server: to each client, write as fast as it takes.
slow-readers HOST PORT N SECONDS
                         N connections with a 4 KiB receive buffer that read
                         nothing for SECONDS; prints "stalled" once all are
                         open, then {"open": n}.
"""
import asyncio, hashlib, json, os, random, resource, socket, ssl, struct, sys, threading, time

CHUNK = 1 << 20

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def stream(seed, n):
    """n bytes of a deterministic pseudo-random stream, in chunks."""
    rng = random.Random(seed)
    while n > 0:
        k = min(n, CHUNK)
        yield rng.randbytes(k)
        n -= k


def drain_hash(f):
    """Reads `f` to EOF: (bytes read, sha256 hex of them)."""
    h, n = hashlib.sha256(), 0
    while True:
        d = f.read1(65536)
        if not d:
            return n, h.hexdigest()
        h.update(d)
        n += len(d)


def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def hostport(addr):
    """ "h:p", or "[h]:p" for IPv6, as the data plane writes addresses. """
    h, p = addr[0], addr[1]
    return ("[%s]:%d" if ":" in h else "%s:%d") % (h, p)


def pre_addr(ip):
    """The preamble's family byte and address bytes for ip."""
    if ":" in ip:
        return bytes([6]), socket.inet_pton(socket.AF_INET6, ip)
    return bytes([4]), socket.inet_aton(ip)


def listen(host, port):
    # "::" listens on both families (a dual-stack server).
    s = socket.socket(family(host))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port)))
    s.listen(4096)
    print("listening", flush=True)
    return s


def accept_forever(s, handle):
    while True:
        c, addr = s.accept()
        print("accepted %s" % hostport(addr), flush=True)
        threading.Thread(target=handle, args=(c, addr), daemon=True).start()


def serve(host, port, name):
    def handle(c, addr):
        with c:
            c.sendall((json.dumps({"server": name, "peer": hostport(addr)}) + "\n").encode())
            while True:
                d = c.recv(65536)
                if not d:
                    break
                c.sendall(d)

    accept_forever(listen(host, port), handle)


def sink(host, port, delay=0):
    def handle(c, addr):
        with c:
            f = c.makefile("rb")
            m, seed = f.readline().split()
            time.sleep(float(delay))
            n, sha = drain_hash(f)
            c.sendall((json.dumps({"got": n, "sha": sha}) + "\n").encode())
            for chunk in stream(int(seed), int(m)):
                c.sendall(chunk)

    accept_forever(listen(host, port), handle)


def greet(host, port, n):
    def handle(c, addr):
        with c:
            for chunk in stream(3, int(n)):
                c.sendall(chunk)

    accept_forever(listen(host, port), handle)


def read_all(host, port, n):
    c = socket.create_connection((host, int(port)), timeout=30)
    k, got = drain_hash(c.makefile("rb"))
    want = hashlib.sha256()
    for chunk in stream(3, int(n)):
        want.update(chunk)
    print(json.dumps({"got": k, "ok": got == want.hexdigest()}), flush=True)


def reset(host, port):
    def handle(c, addr):
        c.recv(1)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()

    accept_forever(listen(host, port), handle)


def read_line(f):
    line = f.readline()
    if not line:
        raise SystemExit("connection closed before a full line")
    return line


def connect(host, port, bind_port=None, count=1, payload="ping"):
    for i in range(count):
        c = socket.socket(family(host))
        c.settimeout(10)
        if bind_port:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            c.bind(("::" if ":" in host else "0.0.0.0", int(bind_port) + i))
        c.connect((host, int(port)))
        f = c.makefile("rb")
        hello = json.loads(read_line(f))
        c.sendall(payload.encode() + b"\n")
        echo = read_line(f).decode().strip()
        out = {
            "local": hostport(c.getsockname()),
            "peer": hostport(c.getpeername()),
            "server": hello["server"],
            "server_saw": hello["peer"],
            "echo": echo,
        }
        f.close()
        c.close()
        print(json.dumps(out), flush=True)


def transfer(host, port, n, m, wait=0):
    n, m = int(n), int(m)
    c = socket.create_connection((host, int(port)), timeout=60)
    time.sleep(float(wait))
    c.sendall(b"%d 2\n" % m)
    sent = hashlib.sha256()
    for chunk in stream(1, n):
        sent.update(chunk)
        c.sendall(chunk)
    c.shutdown(socket.SHUT_WR)  # half-close: the reply must still arrive
    f = c.makefile("rb")
    reply = json.loads(read_line(f))
    k, got = drain_hash(f)
    want = hashlib.sha256()
    for chunk in stream(2, m):
        want.update(chunk)
    print(json.dumps({
        "sent": n, "server_got": reply["got"], "sent_ok": reply["sha"] == sent.hexdigest(),
        "received": k, "received_ok": got == want.hexdigest(),
    }), flush=True)


def expect_reset(host, port):
    t = time.time()
    try:
        # A reset can beat the end of connect(): with a timeout Python reads
        # the connect result from SO_ERROR, where the reset already is.
        c = socket.create_connection((host, int(port)), timeout=10)
        c.sendall(b"x")
        d = c.recv(100)
        what = "data" if d else "eof"
    except ConnectionResetError:
        what = "reset"
    except socket.timeout:
        what = "timeout"
    print(json.dumps({"result": what, "seconds": time.time() - t}), flush=True)


def wait_close(host, port, limit):
    """Connects, reads the greeting, then says nothing and waits for the
    connection to end (at most `limit` seconds): how and when it ended."""
    c = socket.create_connection((host, int(port)), timeout=10)
    f = c.makefile("rb")
    read_line(f)
    print(json.dumps({"open": True}), flush=True)  # the caller may act now
    c.settimeout(float(limit))
    t = time.time()
    try:
        what = "data" if c.recv(100) else "eof"
    except ConnectionResetError:
        what = "reset"
    except socket.timeout:
        what = "open"
    print(json.dumps({"result": what, "seconds": time.time() - t}), flush=True)


async def many(host, port, n):
    async def one(i):
        r, w = await asyncio.open_connection(host, int(port))
        hello = json.loads(await r.readline())
        payload = (b"%08d" % i) * 128
        w.write(payload)
        await w.drain()
        got = await r.readexactly(len(payload))
        w.close()
        return got == payload and "server" in hello

    ok = 0
    # Open all N, then exchange: they are all live at once.
    results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    ok = sum(1 for x in results if x is True)
    errors = [repr(x) for x in results if isinstance(x, BaseException)][:3]
    print(json.dumps({"ok": ok, "errors": errors}), flush=True)


def slow(host, port, seconds):
    out = {"ok": False, "lines": 0, "error": None}
    try:
        c = socket.create_connection((host, int(port)), timeout=15)
        f = c.makefile("rb")
        read_line(f)
        end = time.time() + float(seconds)
        while time.time() < end:
            line = b"line %d\n" % out["lines"]
            c.sendall(line)
            if f.readline() != line:
                raise ConnectionError("echo mismatch or EOF after %d lines" % out["lines"])
            out["lines"] += 1
            time.sleep(0.1)
        c.close()
        out["ok"] = True
    except Exception as e:
        out["error"] = repr(e)
    print(json.dumps(out), flush=True)


def try_connect(host, port):
    try:
        c = socket.create_connection((host, int(port)), timeout=5)
        c.close()
        r = "connected"
    except ConnectionRefusedError:
        r = "refused"
    except Exception as e:
        r = repr(e)
    print(json.dumps({"result": r}), flush=True)


def serial(path):
    print(json.dumps({"serial": ssl._ssl._test_decode_cert(path)["serialNumber"]}), flush=True)


def aserve(host, port, name):
    async def handle(r, w):
        peer = w.get_extra_info("peername")
        print("accepted %s:%d" % peer[:2], flush=True)
        w.write((json.dumps({"server": name, "peer": hostport(peer)}) + "\n").encode())
        try:
            while True:
                d = await r.read(65536)
                if not d:
                    break
                w.write(d)
                await w.drain()
        except ConnectionError:
            pass
        w.close()

    async def main():
        srv = await asyncio.start_server(handle, host, int(port), backlog=4096, reuse_address=True)
        print("listening", flush=True)
        await srv.serve_forever()

    asyncio.run(main())


def stall(host, port, n):
    socks = [socket.create_connection((host, int(port)), timeout=30) for _ in range(int(n))]
    t = time.time()
    closed, worst = 0, 0.0
    for s in socks:
        try:
            while s.recv(4096):
                pass
        except (ConnectionError, socket.timeout):
            pass
        closed += 1
        worst = max(worst, time.time() - t)
    print(json.dumps({"closed": closed, "max_seconds": worst}), flush=True)


async def burst(host, n, ports):
    async def one(i):
        port = int(ports[i % len(ports)])
        try:
            r, w = await asyncio.open_connection(host, port)
            line = await asyncio.wait_for(r.readline(), 10)
            w.close()
            if not line:
                return "refused"
            return "right" if json.loads(line)["server"] == "s%d" % port else "wrong"
        except (ConnectionError, asyncio.TimeoutError, OSError):
            return "refused"

    results = await asyncio.gather(*(one(i) for i in range(n)))
    print(json.dumps({k: results.count(k) for k in ("right", "wrong", "refused")}), flush=True)


async def hold_verify(host, port, n, seconds):
    async def one(i):
        r, w = await asyncio.open_connection(host, int(port))
        json.loads(await asyncio.wait_for(r.readline(), 60))
        for phase in (1, 2):
            payload = b"%d-%08d|" % (phase, i) * 16
            w.write(payload)
            await w.drain()
            if await asyncio.wait_for(r.readexactly(len(payload)), 60) != payload:
                raise ValueError("connection %d: echo mismatch" % i)
            if phase == 1:
                await asyncio.sleep(seconds)
        w.close()
        return True

    results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    errors = [repr(x) for x in results if isinstance(x, BaseException)]
    print(json.dumps({"ok": sum(1 for x in results if x is True), "errors": errors[:5]}), flush=True)


def raw(host, port, what):
    c = socket.create_connection((host, int(port)), timeout=15)
    t = time.time()
    data = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" if what == "garbage" else os.urandom(4096)
    n = 0
    try:
        c.sendall(data)
        while True:
            d = c.recv(65536)
            if not d:
                break
            n += len(d)
    except (ConnectionError, socket.timeout):
        pass
    print(json.dumps({"reply_bytes": n, "seconds": time.time() - t}), flush=True)


def tls(host, port, ca, cert, key, dst, version="tls13"):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if version == "tls12":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(ca)
    if cert != "-":
        ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["dataplane-tunnel/1"])
    raw = socket.create_connection((host, int(port)), timeout=10)
    out = {"handshake": "ok", "reply": None, "error": None}
    try:
        c = ctx.wrap_socket(raw)
        out["server_serial"] = c.getpeercert()["serialNumber"]
    except Exception as e:  # refused during the handshake
        out["handshake"] = repr(e)
        print(json.dumps(out), flush=True)
        return
    if dst == "garbage":
        pre = b"\xff" * 10
    elif dst == "truncated":
        c.sendall(bytes([1, 4, 0]))
        pre = None
    elif dst == "stall":  # handshake done, then nothing: wait for the close
        t = time.time()
        try:
            while c.recv(100):
                pass
        except (ssl.SSLError, ConnectionError, socket.timeout):
            pass
        out["closed_after"] = time.time() - t
        print(json.dumps(out), flush=True)
        return
    elif dst.startswith("drip:"):  # a valid preamble, one byte every 0.3 s
        ip, p = dst[5:].rsplit(":", 1)
        fam, a = pre_addr(ip.strip("[]"))
        pre = bytes([1]) + fam + struct.pack(">H", int(p)) + a + b"\0\0"
        t = time.time()
        c.settimeout(0.3)
        sent, closed = 0, False
        for b in pre:
            try:
                c.sendall(bytes([b]))
                sent += 1
                closed = not c.recv(100)  # waits out the pause between bytes
            except (socket.timeout, TimeoutError):
                continue
            except (ssl.SSLError, OSError):
                closed = True
            if closed:
                break
        out["sent"] = sent
        if not closed:  # the whole preamble went through: is it served?
            c.settimeout(5)
            try:
                c.sendall(b"ping\n")
                out["reply"] = c.recv(100).decode(errors="replace")
            except Exception as e:
                out["error"] = repr(e)
        out["closed_after"] = time.time() - t
        print(json.dumps(out), flush=True)
        return
    elif dst == "oversized":
        fam, a = pre_addr(host)
        pre = bytes([1]) + fam + bytes([0, 80]) + a + b"\xff\xff" + b"\0" * 300
    elif dst == "version2":
        fam, a = pre_addr(host)
        pre = bytes([2]) + fam + bytes([0, 80]) + a + b"\0\0"
    else:
        ip, p = dst.rsplit(":", 1)
        fam, a = pre_addr(ip.strip("[]"))
        pre = bytes([1]) + fam + struct.pack(">H", int(p)) + a + b"\0\0"
    try:
        if pre is None:  # truncated: part of a preamble, then close_notify
            c = c.unwrap()
            c.close()
            print(json.dumps(out), flush=True)
            return
        c.sendall(pre + b"ping\n")
        out["reply"] = c.recv(100).decode(errors="replace")
    except Exception as e:  # TLS 1.3 reports a refused client certificate here
        out["error"] = repr(e)
    print(json.dumps(out), flush=True)


def tls_serve(host, port, ca, cert, key):
    """A TLS 1.3 server speaking our ALPN with the given certificate,
    asking for a client certificate from `ca`: prints one line per
    connection ("served" with what it read, or the error), forever."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.set_alpn_protocols(["dataplane-tunnel/1"])

    def handle(c, addr):
        try:
            with ctx.wrap_socket(c, server_side=True) as t:
                t.settimeout(5)
                got = t.recv(4096)
                print(json.dumps({"served": len(got)}), flush=True)
        except Exception as e:
            print(json.dumps({"error": repr(e)}), flush=True)

    accept_forever(listen(host, port), handle)


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def keep_open(host, port, seconds, talk, counts):
    """One connection slot: connect, run talk(reader, writer) until the
    server closes, re-open, until the deadline."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        counts["attempts"] = counts.get("attempts", 0) + 1
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout=1)
        except (OSError, asyncio.TimeoutError):
            counts["failed_connects"] = counts.get("failed_connects", 0) + 1
            await asyncio.sleep(0.05)
            continue
        counts["opened"] += 1
        try:
            await asyncio.wait_for(talk(r, w), timeout=max(0.01, deadline - time.time()))
            counts["closed_by_server"] += 1
        except asyncio.TimeoutError:
            pass
        except OSError:
            counts["closed_by_server"] += 1
        w.close()


async def crowd(host, port, idle, slow, seconds):
    raise_nofile()
    counts = {"opened": 0, "closed_by_server": 0}

    async def silent(r, w):
        while await r.read(4096):
            pass

    async def dribble(r, w):
        for b in b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n":
            w.write(bytes([b]))
            await w.drain()
            await asyncio.sleep(1)
        while await r.read(4096):
            pass

    tasks = [keep_open(host, port, seconds, silent, counts) for _ in range(idle)]
    tasks += [keep_open(host, port, seconds, dribble, counts) for _ in range(slow)]
    async def announce():
        while counts["opened"] < idle + slow:
            await asyncio.sleep(0.05)
        print("crowding", flush=True)
    await asyncio.gather(announce(), *tasks)
    print(json.dumps(counts), flush=True)


async def hold_silent(host, port, n, seconds, hello=False):
    raise_nofile()
    counts = {"opened": 0, "closed_by_server": 0}

    async def silent(r, w):
        if hello:  # the first byte of a TLS record, then nothing
            w.write(b"\x16")
            await w.drain()
        while await r.read(4096):
            pass

    async def announce():
        while counts.get("attempts", 0) < n:
            await asyncio.sleep(0.05)
        print("holding", flush=True)
    await asyncio.gather(announce(), *[keep_open(host, port, seconds, silent, counts) for _ in range(n)])
    print(json.dumps(counts), flush=True)


def blast(host, port):
    chunk = b"x" * 65536
    def handle(c, addr):
        try:
            while True:
                c.sendall(chunk)
        except OSError:
            pass
    accept_forever(listen(host, port), handle)


def slow_readers(host, port, n, seconds):
    raise_nofile()
    socks = []
    for _ in range(int(n)):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((host, int(port)))
        socks.append(s)
    print("stalled", flush=True)
    time.sleep(float(seconds))
    print(json.dumps({"open": len(socks)}), flush=True)


if __name__ == "__main__":
    a = sys.argv[1:]
    cmd = a[0]
    if cmd == "serve":
        serve(a[1], a[2], a[3])
    elif cmd == "sink":
        sink(*a[1:4])
    elif cmd == "reset":
        reset(a[1], a[2])
    elif cmd == "connect":
        opts = dict(zip(a[3::2], a[4::2]))
        connect(a[1], a[2], opts.get("--bind-port"), int(opts.get("--count", 1)), opts.get("--payload", "ping"))
    elif cmd == "transfer":
        transfer(*a[1:6])
    elif cmd == "greet":
        greet(a[1], a[2], a[3])
    elif cmd == "read":
        read_all(a[1], a[2], a[3])
    elif cmd == "tls-serve":
        tls_serve(*a[1:6])
    elif cmd == "wait-close":
        wait_close(*a[1:4])
    elif cmd == "expect-reset":
        expect_reset(a[1], a[2])
    elif cmd == "many":
        asyncio.run(many(a[1], a[2], int(a[3])))
    elif cmd == "slow":
        slow(a[1], a[2], a[3])
    elif cmd == "try-connect":
        try_connect(a[1], a[2])
    elif cmd == "serial":
        serial(a[1])
    elif cmd == "aserve":
        aserve(a[1], a[2], a[3])
    elif cmd == "stall":
        stall(a[1], a[2], a[3])
    elif cmd == "burst":
        asyncio.run(burst(a[1], int(a[2]), a[3:]))
    elif cmd == "hold-verify":
        asyncio.run(hold_verify(a[1], a[2], int(a[3]), float(a[4])))
    elif cmd == "raw":
        raw(a[1], a[2], a[3])
    elif cmd == "crowd":
        asyncio.run(crowd(a[1], a[2], int(a[3]), int(a[4]), float(a[5])))
    elif cmd == "hold-silent":
        asyncio.run(hold_silent(a[1], a[2], int(a[3]), float(a[4]), a[5:6] == ["hello"]))
    elif cmd == "blast":
        blast(a[1], a[2])
    elif cmd == "slow-readers":
        slow_readers(a[1], a[2], a[3], a[4])
    elif cmd == "tls":
        tls(*a[1:8])
    else:
        raise SystemExit("usage: see the docstring of peers.py")
