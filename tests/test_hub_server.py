"""The local Hub server (`genesis_hf.testing.hub_server`) against the real `huggingface_hub` client."""

import threading
import time

import httpx2
import pytest
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from genesis_hf.testing import HubServer


@pytest.fixture
def hub():
    server = HubServer().start()
    yield server
    server.stop()


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "folder"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("hello")
    (root / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 8)
    (root / "README.md").write_text("---\nlicense: apache-2.0\n---\n# card\n")
    return root


def test_whoami_reports_user_orgs_and_token_role(hub):
    write = HfApi(endpoint=hub.endpoint, token=hub.write_token).whoami()
    assert write["name"] == "alice"
    assert [org["name"] for org in write["orgs"]] == ["genesis-org"]
    assert write["auth"]["accessToken"]["role"] == "write"
    assert HfApi(endpoint=hub.endpoint, token=hub.read_token).whoami()["auth"]["accessToken"]["role"] == "read"
    with pytest.raises(HfHubHTTPError, match="Invalid user token"):
        HfApi(endpoint=hub.endpoint, token="hf_not_a_token").whoami()


def test_repo_branches_commits_tree_and_downloads(hub, folder, tmp_path):
    api = HfApi(endpoint=hub.endpoint, token=hub.write_token)
    url = api.create_repo("alice/demo", exist_ok=True)
    assert url.repo_id == "alice/demo"
    assert api.create_repo("alice/demo", exist_ok=True).repo_id == "alice/demo"  # 409 answered with the url
    with pytest.raises(HfHubHTTPError):
        api.create_repo("alice/demo")

    api.create_branch("alice/demo", branch="step-0000001")
    api.create_branch("alice/demo", branch="step-0000001", exist_ok=True)
    commit = api.upload_folder(repo_id="alice/demo", folder_path=folder, revision="step-0000001", delete_patterns="*")
    assert sorted(api.list_repo_files("alice/demo", revision="step-0000001")) == [
        ".gitattributes",
        "README.md",
        "a.txt",
        "sub/weights.bin",
    ]
    assert api.list_repo_files("alice/demo") == [".gitattributes"]  # main untouched
    refs = {branch.name: branch.target_commit for branch in api.list_repo_refs("alice/demo").branches}
    assert refs["step-0000001"] == commit.oid
    info = api.model_info("alice/demo", revision="step-0000001")
    assert info.sha == commit.oid and {sibling.rfilename for sibling in info.siblings} >= {"a.txt", "sub/weights.bin"}
    top_level = {entry.path for entry in api.list_repo_tree("alice/demo", revision="step-0000001")}
    assert top_level == {".gitattributes", "README.md", "a.txt", "sub"}
    assert [item.title for item in api.list_repo_commits("alice/demo", revision="step-0000001")][
        -1
    ] == "initial commit"

    # An unchanged re-upload makes no commit (preupload reports the same oids).
    again = api.upload_folder(repo_id="alice/demo", folder_path=folder, revision="step-0000001")
    assert again.oid == commit.oid

    cache = tmp_path / "cache"
    path = hf_hub_download(
        "alice/demo", "sub/weights.bin", revision="step-0000001", endpoint=hub.endpoint, cache_dir=cache
    )
    assert open(path, "rb").read() == (folder / "sub" / "weights.bin").read_bytes()
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("alice/demo", "missing.txt", revision="step-0000001", endpoint=hub.endpoint, cache_dir=cache)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("alice/demo", "a.txt", revision="no-such-branch", endpoint=hub.endpoint, cache_dir=cache)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/absent")


def test_branches_from_a_commit_and_the_parent_commit_guard(hub, folder):
    api = HfApi(endpoint=hub.endpoint, token=hub.write_token)
    api.create_repo("alice/refs")
    first = api.upload_folder(repo_id="alice/refs", folder_path=folder)
    (folder / "a.txt").write_text("second")
    second = api.upload_folder(repo_id="alice/refs", folder_path=folder, parent_commit=first.oid)
    api.create_branch("alice/refs", branch="step-0000001", revision=first.oid)
    refs = {branch.name: branch.target_commit for branch in api.list_repo_refs("alice/refs").branches}
    assert refs == {"main": second.oid, "step-0000001": first.oid}
    assert api.list_repo_files("alice/refs", revision="step-0000001") == api.list_repo_files("alice/refs")
    # A commit made against an older head is refused, as on the Hub.
    (folder / "a.txt").write_text("stale")
    with pytest.raises(HfHubHTTPError, match="412"):
        api.upload_folder(repo_id="alice/refs", folder_path=folder, parent_commit=first.oid)
    assert api.model_info("alice/refs").sha == second.oid


def test_resolve_headers_head_and_range(hub, folder):
    api = HfApi(endpoint=hub.endpoint, token=hub.write_token)
    api.create_repo("alice/raw")
    api.upload_folder(repo_id="alice/raw", folder_path=folder)
    url = f"{hub.endpoint}/alice/raw/resolve/main/a.txt"
    head = httpx2.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["Content-Length"] == "5"
    assert head.headers["X-Repo-Commit"] == api.model_info("alice/raw").sha
    assert head.headers["ETag"].strip('"')
    ranged = httpx2.get(url, headers={"Range": "bytes=1-3"})
    assert ranged.status_code == 206 and ranged.content == b"ell"
    missing = httpx2.head(f"{hub.endpoint}/alice/raw/resolve/main/nope")
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "EntryNotFound"


def test_lfs_uploads(hub, folder, monkeypatch):
    # hf_xet is installed in this environment: without this the client would try Xet storage for LFS files.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    hub.lfs_threshold = 1024
    api = HfApi(endpoint=hub.endpoint, token=hub.write_token)
    api.create_repo("alice/lfs")
    api.upload_folder(repo_id="alice/lfs", folder_path=folder)
    repo = hub.get_repo("alice/lfs")
    files = repo.resolve("main").files
    assert files["sub/weights.bin"].lfs and not files["a.txt"].lfs
    assert files["sub/weights.bin"].content == (folder / "sub" / "weights.bin").read_bytes()
    assert hub.requests_matching(r"POST /alice/lfs\.git/info/lfs/objects/batch")
    sibling = {s.rfilename: s for s in api.model_info("alice/lfs").siblings}["sub/weights.bin"]
    assert sibling.lfs is not None and sibling.lfs.size == 2048


def test_permissions(hub):
    reader = HfApi(endpoint=hub.endpoint, token=hub.read_token)
    with pytest.raises(HfHubHTTPError, match="403"):
        reader.create_repo("alice/nope")
    writer = HfApi(endpoint=hub.endpoint, token=hub.write_token)
    with pytest.raises(HfHubHTTPError, match="403"):
        writer.create_repo("someone-else/nope")
    writer.create_repo("genesis-org/shared")  # an organisation of the user
    writer.create_repo("alice/secret", private=True)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=False).model_info("alice/secret")
    assert writer.model_info("alice/secret").private


def test_failure_injection_error_drop_stall_and_nth(hub):
    api = HfApi(endpoint=hub.endpoint, token=hub.write_token)
    hub.add_failure(r"GET /api/whoami-v2", action="error", status=503)
    with pytest.raises(HfHubHTTPError, match="503"):
        api.whoami()
    api.whoami()  # times=1: the next one passes

    hub.add_failure(r"POST /api/repos/create", action="drop")
    with pytest.raises(httpx2.RemoteProtocolError):
        api.create_repo("alice/dropped")
    assert hub.requests_matching("POST /api/repos/create")[-1].injected == "drop"
    api.create_repo("alice/dropped")

    hub.add_failure(r"/refs", action="stall", delay=0.5)
    started = time.monotonic()
    api.list_repo_refs("alice/dropped")
    assert time.monotonic() - started >= 0.5

    stall = hub.add_failure(r"/refs", action="stall", delay=600.0)
    threading.Timer(0.3, stall.release).start()
    started = time.monotonic()
    api.list_repo_refs("alice/dropped")
    assert 0.3 <= time.monotonic() - started < 30

    hub.fail_nth_request(2)
    api.whoami()
    with pytest.raises(HfHubHTTPError, match="500"):
        api.whoami()
    api.whoami()
