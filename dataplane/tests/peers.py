#!/usr/bin/env python3
"""Unmodified TCP peers for the data plane's kernel tests (standard library only).

serve HOST PORT NAME      accept forever; to each client send one JSON line
                          {"server": NAME, "peer": "ip:port"}, then echo what it
                          sends until EOF, then close.
connect HOST PORT [--bind-port P] [--count N] [--barrier FILE]
                          N times (the i-th from source port P+i if given): connect, read the server's line, send "ping\n",
                          read the echo, close; print one JSON line per connection
                          {"local", "peer", "server", "server_saw", "echo"}.
                          With --barrier, wait until FILE exists before each connect.
Prints "listening" on stdout once the server listens.
"""
import json, os, socket, sys, threading, time


def serve(host, port, name):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, int(port)))
    s.listen(1024)
    print("listening", flush=True)

    def handle(c, addr):
        with c:
            c.sendall((json.dumps({"server": name, "peer": "%s:%d" % addr}) + "\n").encode())
            while True:
                d = c.recv(65536)
                if not d:
                    break
                c.sendall(d)

    while True:
        c, addr = s.accept()
        threading.Thread(target=handle, args=(c, addr), daemon=True).start()


def read_line(f):
    line = f.readline()
    if not line:
        raise SystemExit("connection closed before a full line")
    return line


def connect(host, port, bind_port=None, count=1, barrier=None):
    for i in range(count):
        if barrier:
            deadline = time.time() + 10
            while not os.path.exists(barrier):
                if time.time() > deadline:
                    raise SystemExit("barrier never opened")
                time.sleep(0.001)
        c = socket.socket()
        c.settimeout(10)
        if bind_port:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            c.bind(("0.0.0.0", int(bind_port) + i))
        c.connect((host, int(port)))
        f = c.makefile("rb")
        hello = json.loads(read_line(f))
        c.sendall(b"ping\n")
        echo = read_line(f).decode().strip()
        out = {
            "local": "%s:%d" % c.getsockname(),
            "peer": "%s:%d" % c.getpeername(),
            "server": hello["server"],
            "server_saw": hello["peer"],
            "echo": echo,
        }
        f.close()
        c.close()
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    a = sys.argv[1:]
    if a[0] == "serve":
        serve(a[1], a[2], a[3])
    elif a[0] == "connect":
        opts = dict(zip(a[3::2], a[4::2]))
        connect(a[1], a[2], opts.get("--bind-port"), int(opts.get("--count", 1)), opts.get("--barrier"))
    else:
        raise SystemExit("usage: peers.py serve|connect ...")
