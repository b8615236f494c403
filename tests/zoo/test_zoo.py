"""The model zoo: readme parsing, search path, resolution, and fetching over loopback HTTP."""

import hashlib
import http.server
import threading

import pytest
from click.testing import CliRunner

from brewnet import zoo
from brewnet.cli import main

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB of "weights"
SHA1 = hashlib.sha1(PAYLOAD).hexdigest()


def write_model(root, key="tiny", sha1=SHA1, url="http://127.0.0.1:1/tiny.caffemodel", extra=""):
    folder = root / key
    folder.mkdir(parents=True)
    (folder / "readme.md").write_text(
        f"---\nname: Tiny model\ncaffemodel: tiny.caffemodel\ncaffemodel_url: {url}\n"
        f"license: BSD-2-Clause\nsha1: {sha1}\n{extra}---\n\nA model for tests.\n")
    (folder / "deploy.prototxt").write_text(
        'name: "tiny"\nlayer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } } }\n')
    return folder


@pytest.fixture
def zoo_env(tmp_path, monkeypatch):
    root = tmp_path / "zoo"
    root.mkdir()
    monkeypatch.setenv("BREWNET_ZOO", str(root))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return root


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD (or a corrupted copy) at any path, honouring `Range: bytes=N-`."""

    body = PAYLOAD
    requests = []

    def do_GET(self):
        type(self).requests.append(self.headers.get("Range"))
        body, status = self.body, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            body, status = body[start:], 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    RangeHandler.body = PAYLOAD
    RangeHandler.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_fetch_verify_and_resolve(zoo_env, server):
    write_model(zoo_env, url=f"{server}/tiny.caffemodel")
    with pytest.raises(zoo.ZooError, match="not fetched yet: run `brewnet zoo fetch tiny`"):
        zoo.resolve_weights("zoo:tiny")
    result = run("zoo", "fetch", "tiny")
    assert result.exit_code == 0, result.output
    path = zoo.resolve_weights("zoo:tiny")
    assert open(path, "rb").read() == PAYLOAD
    assert path.startswith(str(zoo.cache_dir()))
    assert run("zoo", "verify", "tiny").exit_code == 0
    listed = run("zoo", "list").output
    assert "tiny" in listed and "present" in listed and "ok" in listed
    # a second fetch finds it verified and downloads nothing
    RangeHandler.requests.clear()
    assert "already present" in run("zoo", "fetch", "tiny").output
    assert RangeHandler.requests == []


def test_fetch_resumes_a_partial_download(zoo_env, server):
    model = zoo.find_model(write_model(zoo_env, url=f"{server}/tiny.caffemodel").name)
    part = model.cached_weights.with_name(model.cached_weights.name + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[:1000])
    assert run("zoo", "fetch", "tiny").exit_code == 0
    assert RangeHandler.requests == ["bytes=1000-"]
    assert model.cached_weights.read_bytes() == PAYLOAD and not part.exists()


def test_corrupted_download_is_refused_and_removed(zoo_env, server):
    RangeHandler.body = PAYLOAD[:-1] + b"\x00"
    model = zoo.find_model(write_model(zoo_env, url=f"{server}/tiny.caffemodel").name)
    result = run("zoo", "fetch", "tiny")
    assert result.exit_code != 0
    assert "does not match" in result.output and "Traceback" not in result.output
    assert not model.cached_weights.exists()
    assert not model.cached_weights.with_name(model.cached_weights.name + ".part").exists()


def test_fetch_from_file_url_and_unreachable_url(zoo_env, tmp_path):
    source = tmp_path / "weights.bin"
    source.write_bytes(PAYLOAD)
    write_model(zoo_env)
    assert run("zoo", "fetch", "tiny", "--url", source.as_uri()).exit_code == 0
    write_model(zoo_env, key="far", url="http://127.0.0.1:9/none.caffemodel")
    result = run("zoo", "fetch", "far", "--timeout", "2")
    assert result.exit_code != 0 and "cannot download" in result.output and "Traceback" not in result.output


def test_unknown_name_suggests(zoo_env):
    write_model(zoo_env)
    result = run("zoo", "info", "tinny")
    assert result.exit_code != 0
    assert "did you mean 'tiny'" in result.output
    assert "known models: " in result.output and "tiny" in result.output.split("known models: ")[1]


def test_readme_problems_name_the_file_and_field(tmp_path):
    bad = tmp_path / "readme.md"
    bad.write_text("# no front matter\n")
    with pytest.raises(zoo.ZooError, match="readme.md: no YAML front matter"):
        zoo.read_front_matter(bad)
    bad.write_text("---\nname: x\ncaffemodel: x.caffemodel\nlicense: MIT\nsha1: 00\n---\n")
    with pytest.raises(zoo.ZooError, match="lacks the required field 'caffemodel_url'"):
        zoo.read_front_matter(bad)


def test_resolve_model_gives_the_deploy_prototxt(zoo_env):
    folder = write_model(zoo_env)
    assert zoo.resolve_model("zoo:tiny") == str(folder / "deploy.prototxt")
    assert zoo.resolve_model("plain/path.prototxt") == "plain/path.prototxt"


def test_bvlc_model_folders_list_as_zoo_entries(fixtures, monkeypatch, tmp_path):
    monkeypatch.setenv("BREWNET_ZOO", str(fixtures / "bvlc-caffe" / "models"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    output = run("zoo", "list").output
    for key in ("bvlc_alexnet", "bvlc_reference_caffenet"):
        assert key in output
    model = zoo.find_model("bvlc_alexnet")
    assert model.meta["sha1"] == "9116a64c0fbe4459d18f4bb6b56d647b63920377"
    assert "not fetched" in output


def test_zoo_add_imports_a_checked_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("BREWNET_ZOO", raising=False)
    src = write_model(tmp_path / "src")
    (src / "tiny.caffemodel").write_bytes(PAYLOAD)
    result = run("zoo", "add", str(src))
    assert result.exit_code == 0, result.output
    assert "weights verified" in result.output
    assert zoo.resolve_weights("zoo:tiny").startswith(str(zoo.cache_dir()))
    # a second add of the same name is refused
    assert run("zoo", "add", str(src)).exit_code != 0


# -- hostile readmes, names and servers (issue 14) --------------------------------------

@pytest.mark.parametrize("caffemodel", ["../../../../victim.txt", "/tmp/victim.txt", "sub/../../victim.txt",
                                        "..\\\\victim.txt", "C:/victim.txt"])
def test_a_readme_path_that_leaves_its_folder_is_refused(zoo_env, server, tmp_path, caffemodel):
    folder = write_model(zoo_env, url=f"{server}/tiny.caffemodel")
    readme = folder / "readme.md"
    readme.write_text(readme.read_text().replace("caffemodel: tiny.caffemodel", f"caffemodel: '{caffemodel}'"))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    result = run("zoo", "fetch", "tiny")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "caffemodel: must name a file inside the model folder" in result.output
    assert victim.read_text() == "precious" and RangeHandler.requests == []


def test_a_zoo_name_that_climbs_out_is_refused(zoo_env):
    write_model(zoo_env.parent, key="outside")
    for name in ("../outside", "zoo:../outside", "/etc", ".."):
        with pytest.raises(zoo.ZooError, match="invalid zoo model name"):
            zoo.find_model(name)


def test_a_readme_url_must_be_http_or_a_file_of_its_folder(zoo_env, tmp_path):
    (tmp_path / "secret").write_bytes(PAYLOAD)
    write_model(zoo_env, url=(tmp_path / "secret").as_uri())
    result = run("zoo", "fetch", "tiny")
    assert result.exit_code == 1 and "caffemodel_url: only http(s) URLs" in result.output
    write_model(zoo_env, key="rel", url="../../secret")
    result = run("zoo", "fetch", "rel")
    assert result.exit_code == 1 and "caffemodel_url: must name a file inside the model folder" in result.output


def test_zoo_add_refuses_symbolic_links(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("BREWNET_ZOO", raising=False)
    src = write_model(tmp_path / "src")
    (tmp_path / "private").write_text("not for the zoo")
    (src / "notes.txt").symlink_to(tmp_path / "private")
    result = run("zoo", "add", str(src))
    assert result.exit_code == 1 and "symbolic links (notes.txt)" in result.output
    assert not (zoo.cache_dir() / "tiny").exists()


class ScriptedHandler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD as a test scripts it: chunked, cut short, or with a bad length."""

    mode = "chunked"

    def do_GET(self):
        self.send_response(200)
        if self.mode == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(PAYLOAD), 1 << 16):
                block = PAYLOAD[i:i + (1 << 16)]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block))
            self.wfile.write(b"0\r\n\r\n")
        elif self.mode == "cut":
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[:300_000])  # then the connection closes
            self.close_connection = True
        else:
            self.send_header("Content-Length", "abc")
            self.end_headers()
            self.wfile.write(PAYLOAD[:10])

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ScriptedHandler)
    ScriptedHandler.protocol_version = "HTTP/1.1"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_chunked_response_without_length_downloads(zoo_env, scripted):
    ScriptedHandler.mode = "chunked"
    write_model(zoo_env, url=f"{scripted}/tiny.caffemodel")
    result = run("zoo", "fetch", "tiny")
    assert result.exit_code == 0, result.output
    assert open(zoo.resolve_weights("zoo:tiny"), "rb").read() == PAYLOAD


def test_a_dropped_connection_keeps_the_part_file_to_resume(zoo_env, scripted, server):
    ScriptedHandler.mode = "cut"
    model = zoo.find_model(write_model(zoo_env, url=f"{scripted}/tiny.caffemodel").name)
    result = run("zoo", "fetch", "tiny")
    assert result.exit_code == 1 and "broke off after 300000 of" in result.output and "resume" in result.output
    part = model.cached_weights.with_name(model.cached_weights.name + ".part")
    assert part.read_bytes() == PAYLOAD[:300_000]
    assert run("zoo", "fetch", "tiny", "--url", f"{server}/tiny.caffemodel").exit_code == 0
    assert RangeHandler.requests == ["bytes=300000-"]
    assert model.cached_weights.read_bytes() == PAYLOAD and not part.exists()


def test_an_invalid_content_length_is_one_line(zoo_env, scripted):
    ScriptedHandler.mode = "bad-length"
    write_model(zoo_env, url=f"{scripted}/tiny.caffemodel")
    result = run("zoo", "fetch", "tiny")
    assert result.exit_code == 1 and "invalid Content-Length 'abc'" in result.output
    assert "Traceback" not in result.output


def test_downloads_are_capped_by_size_and_deadline(zoo_env, server, scripted, tmp_path):
    write_model(zoo_env, url=f"{server}/tiny.caffemodel", extra="caffemodel_size: 1000\n")
    result = run("zoo", "fetch", "tiny")
    assert result.exit_code == 1 and "more than the 1000 allowed" in result.output
    ScriptedHandler.mode = "chunked"  # no length announced: the cap applies as bytes arrive
    with pytest.raises(zoo.ZooError, match="more than the 100000 bytes allowed"):
        zoo.download(f"{scripted}/x", tmp_path / "x.caffemodel", SHA1, max_bytes=100_000)
    assert not (tmp_path / "x.caffemodel.part").exists()
    with pytest.raises(zoo.ZooError, match="took longer than 0 s"):
        zoo.download(f"{server}/x", tmp_path / "y.caffemodel", SHA1, deadline=0)
    assert (tmp_path / "y.caffemodel.part").exists()  # kept for the next try
