"""What every script reads in: the six datasets (downloaded and checksummed) and model checkpoints.

Datasets: the six benchmarks of TinyLLM (Tian et al., arXiv 2402.04616, §4.1) with the paper's own splits.
The files are the ones released with the paper: repository YikunHan42/TinyLLM at commit
9f5bebec8b22037f80ffa8d17bfeb01a2a524a3b, folder `datasets/` (the distilling-step-by-step layout):

    <ds>/<ds>_{train,valid,test}.json   a JSON list (obqa: JSON lines) of {id, question, choices, answer}
    <ds>/llm/{split}_CoT_{k}.json       JSON lists of 500 strings each, aligned by position with the split
                                        file: the FLAN-T5-xl rationale, the question, and (not PIQA) the
                                        LLaMA-2 rationale; prompts.parse_release splits them.

Every file is pinned by size and sha256 (PINNED below), except PIQA's train file: no copy of it could be
hashed here, so it is pinned by its git blob id at that commit (sha1 of b"blob <size>\\0" + bytes, what
`git hash-object` prints). When a source does not have that file (HTTP 404, or missing from a folder),
download() fetches `piqa/piqa_train.reconstructed.json` instead, says so in a warning, and keeps it under
that name: 16,113 items in the official order, questions and choices recovered from the release's own
rationale files and labels from PIQA's official train-labels.lst (choices may lack trailing spaces).
It is a stand-in, never passed off as the original; load_split() reads the original whenever present.

Downloads: requests, streamed into `<file>.part` beside the target, fsync, checksum, os.replace. Any error
we can see (HTTP status, a body shorter than its Content-Length, a checksum mismatch) names the file and
the URL and removes the .part. A .part left by a killed process is resumed with an HTTP Range request; if
the server answers 200 instead of 206, or the resumed file fails its checksum, it is fetched again from
byte 0 (once). Files already present and verified are never fetched again.

Checkpoints: a local folder, or a hub id `org/name[@revision]` downloaded once (the Hugging Face hub's file
layout `/{repo}/resolve/{revision}/{file}`), loaded with t5.py or llama.py by config.json's model_type.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import requests
import torch
from torch import nn

import llama
import t5
from cli import Progress, UserError, atomic_write, fsync_path, on_stop


log = logging.getLogger("tinyllm.data")

DATASETS = ("obqa", "arc", "piqa", "riddle", "pubmedqa", "bioasq")
SPLITS = ("train", "valid", "test")
DEFAULT_URL = ("https://raw.githubusercontent.com/YikunHan42/TinyLLM/"
               "9f5bebec8b22037f80ffa8d17bfeb01a2a524a3b/datasets/")

# path under the release's datasets/ -> (size in bytes, sha256); generated once from the release copy
# (../shared/assets/tinyllm_release, PROVENANCE.md §6), 93 files.
PINNED: dict[str, tuple[int, str]] = {
    "arc/arc_test.json": (541870, "bcdb5956e060f1f24e0dbf9e5832fecab74341f3844c1c0e7883f8ef95bb686c"),
    "arc/arc_train.json": (509292, "87b67a6c8491577afc8b8d302ab029bcfc409ed453321667cd4b26080bb3b6bc"),
    "arc/arc_valid.json": (138651, "9b1f66c13c857ebaf72c1f6aefc6aac882363eb3a84ad379394df0410a2cb7a5"),
    "arc/llm/test_CoT_0.json": (450876, "8df18e16f1755125d398918b6d04ba6729505686666effa0e31009520504fd55"),
    "arc/llm/test_CoT_1.json": (445606, "7744493752bf8bbff9fb785412c35cd1d3ab9bfc1e00fa5f809ac699ffa4d804"),
    "arc/llm/test_CoT_2.json": (145499, "b1cc07b7866c8b6eaf6f2d37d75bebf742a51180723184db36d6ec712529cad0"),
    "arc/llm/train_CoT_0.json": (428038, "fc0bbac6c58971bd5f160da6f7520197edff22a462684093ff8fc7a46f3be983"),
    "arc/llm/train_CoT_1.json": (437287, "439a501fcc2488d3132c5fe9e3da0aa89d771d586abb682e071085d56a76afa7"),
    "arc/llm/train_CoT_2.json": (97485, "c9bbe91bbdaa3af96ef6d10c74a2b27c41d9e2a790d36f645819f381250fd0b0"),
    "arc/llm/valid_CoT_0.json": (265753, "fb6ba5a743e4e9ca01d55803f08dd6baec5bdc62616e8bae2a176926b97f95de"),
    "bioasq/bioasq_test.json": (249187, "5f57fbfe4240965378985ac8cc691d3df17cc46824bdb5d54da460daec26bbc8"),
    "bioasq/bioasq_train.json": (3287782, "aabbb0c05d4991eb75da9eb6fb66fcfa6c27a10980a1ccc59390aa829b3b47ec"),
    "bioasq/bioasq_valid.json": (359589, "01d85b90ed5324091b956eb9ef54d002101d4d1a15995122765a72e68ddf6c1a"),
    "bioasq/llm/test_CoT_0.json": (306481, "45b122990e41434c90829ab3e60da4793a81dd4842d6d48ec91d4b287f4d0e5e"),
    "bioasq/llm/train_CoT_0.json": (2553314, "8412bc11aa02bec4560147cf7464de7d8b1af9b1f3ecef2189d7e8d78a775ed6"),
    "bioasq/llm/train_CoT_1.json": (1184759, "65bfa052c55816f31a6f4c7b1f1764b86fedba9d9c3267bbba3a270d8b0c0b8f"),
    "bioasq/llm/valid_CoT_0.json": (409045, "66bc8b979896489e8df7326efec68598f0533d424d315fad028e66d794c6c03d"),
    "obqa/obqa_test.json": (107596, "fa468c9b1548c5fcd92982b7efa18ad8bcd8ab57ea5acdcc1c50291c51127c9b"),
    "obqa/obqa_train.json": (1045856, "cfeec3fa9af8750ec164548108a2920db08ed6aad264bcadfd47aef94a72fcc2"),
    "obqa/obqa_valid.json": (112243, "8703b278ce12eab49f000f1f247e6839c2ea4d4fc009513915a0d3b654c6b8f1"),
    "obqa/llm/test_CoT_0.json": (348284, "e2e13817e4b8020ce738951d34e8342b1a8ea24b23d6358f83d368336066918d"),
    "obqa/llm/train_CoT_0.json": (330134, "808aeceb806f86f54ee4533159e560ee500bc64a43c3fcbcf0703f6e631ab744"),
    "obqa/llm/train_CoT_1.json": (328040, "c0ca41b9c5e2b32790d0cf2bac18b873e23d810d1535cb3c850508c591444dec"),
    "obqa/llm/train_CoT_2.json": (321473, "f21141ab9e4cf3d75a61a21abbe5842d1419615710867a4deeb1050179a28995"),
    "obqa/llm/train_CoT_3.json": (314081, "bfe57f402a4a12fcd27f7aaec184f216621ebd8b4fe1c296e1812ca01a14a8da"),
    "obqa/llm/train_CoT_4.json": (329512, "f452bf6130ecf7fd3b252caa33d61e1d8d726d2ad02e1ca291746b4f7ced453e"),
    "obqa/llm/train_CoT_5.json": (316403, "892251aabb1f39802f95e8df19e2ed049eb2fb799e92500660324e7bac3b67f5"),
    "obqa/llm/train_CoT_6.json": (314773, "3727ee5826bffcfcca537787ba6c47db8f58bcb276e9b8f9c674caadc02e3bbf"),
    "obqa/llm/train_CoT_7.json": (313116, "24d7d0b03425204d79bdaf018f85ee02fd743267455d25ee9586d7b921efe1aa"),
    "obqa/llm/train_CoT_8.json": (317702, "895c86c5c4ecc3c9811e4e819f389329adf4d1f27883857cba28c64912526d08"),
    "obqa/llm/train_CoT_9.json": (280018, "4119922974804e97a9c13ad8198e2dbd710e841c91c6fbafa4c3b1197139be51"),
    "obqa/llm/valid_CoT_0.json": (338940, "83ce667f26561ae4268dd79fc333b96b9ba19cc7331e9f159bc416fb71244bd7"),
    "piqa/piqa_test.json": (444438, "0ad0590c12bd925f041efa2c566a494e716bfece86cc3b2cab378d9448fe1c29"),
    "piqa/piqa_train.reconstructed.json": (7665678, "65ca471919cc7a83f54df442a261e1b801da27a9ad9724fd1e81217b753985b8"),
    "piqa/piqa_valid.json": (422310, "afe2e1d85df182d8a05f8963a48ddde18b1a89743609bbb64735354491f8b644"),
    "piqa/llm/test_CoT_0.json": (287740, "e49edbb3c9af7a231289cd64614c7f0cf27444d752853cd2693669853e28f971"),
    "piqa/llm/test_CoT_1.json": (234230, "3daac39a32cfbf3d1f8f254885cb010f57c34ffbb6ee97ee3e09f0665c78a46e"),
    "piqa/llm/train_CoT_0.json": (279086, "838085085d996187ab64030e208d8c912c2c4255c654ce886a333cdcb6ef656e"),
    "piqa/llm/train_CoT_1.json": (274238, "84511753c742071f8c294999c287defa6901d2e82fcd3405a1e481f6a1f0216d"),
    "piqa/llm/train_CoT_2.json": (258846, "66f637687d717a8f1012eb97dba286a589b579ce1b62e75c79ad4f0abfa0cee4"),
    "piqa/llm/train_CoT_3.json": (270159, "595ae816c376bddcbd5d0ba69b90dd57668fc25dd1078c6c35f4603dfbfe2aaa"),
    "piqa/llm/train_CoT_4.json": (292895, "621144de97855ebbc63f2f07c24a69316b87f987283abacc64c2eb5b5fb638c4"),
    "piqa/llm/train_CoT_5.json": (264702, "2604b21a70e5a0ba55d1ae3761c8bb41da9b0382872e500b7aa29c58d6e08a6e"),
    "piqa/llm/train_CoT_6.json": (288825, "74211fc2ba93c24690646195a34dacb8097988ccec0b6eb436305e80e310de9a"),
    "piqa/llm/train_CoT_7.json": (273755, "5d0828ebeb0d1a7b400052334bd9f1e80f15c83ab88b256662b85398cbf16ed5"),
    "piqa/llm/train_CoT_8.json": (280666, "6bdfd68b7edaf89831ad0660c364fa48f2a999ed48e03707c652a4f07353bdce"),
    "piqa/llm/train_CoT_9.json": (293848, "0b939d2a0333504f6774c3709928b98704f7f344e94b5487c52241d41d3e00d8"),
    "piqa/llm/train_CoT_10.json": (288027, "2156a91910936322c979ea0058bf5002f059fdf45b460df5622372a8ea3bf1d1"),
    "piqa/llm/train_CoT_11.json": (288071, "59d2fb36fd6fd634d4697e3159187693a69616a193dc48a0b47ee0307fe4d687"),
    "piqa/llm/train_CoT_12.json": (276554, "db26e00d6bfcdb1cd446e794b3e30b5e3437ee5af46fb1c5e393a63ad396fd18"),
    "piqa/llm/train_CoT_13.json": (263789, "6d997a8e41ba9c4627f8e9eea969294f458a5dd721b7d0848b99a596b48a2ad7"),
    "piqa/llm/train_CoT_14.json": (278027, "17be1e3d29091ccc9e5c6e3fd67dcecd8109ce2de5a0fd3173ab4e2ba9ba6a46"),
    "piqa/llm/train_CoT_15.json": (272669, "000e84dd44c1fe4ac6634edbffb299ab61c2701ea02ccd18be9b71c0b715d216"),
    "piqa/llm/train_CoT_16.json": (288698, "b9de43e15e50d08cf256066227fa249fe78aa97b6851cba55ddd137c3d6a90b4"),
    "piqa/llm/train_CoT_17.json": (271316, "b9be628b3e4c39ad0e2baceb3f8f3b426ac79a185c620b5ed019aced0aeb7a2a"),
    "piqa/llm/train_CoT_18.json": (267078, "9d4c9e7979d58482f874ae5c9059ba73160d7c0d34848cd68943b255c3748d8b"),
    "piqa/llm/train_CoT_19.json": (277015, "4b48abe1720a7fd1b543e12f3088da4dafd2e7dbac2d5bdc65bdc8c0fafd652d"),
    "piqa/llm/train_CoT_20.json": (284641, "dfc1cd7ced2b1a5c4490cf7bcc39fd8b732ce08e6252cef981182f473dc7792d"),
    "piqa/llm/train_CoT_21.json": (262688, "2b01c0b190ef3b62f5e2f1d17508def6ad899c3f7eeb696932ee222836881939"),
    "piqa/llm/train_CoT_22.json": (287105, "3a0c3ea0aa9c4bd55a23195fc02c31f680ade8f6180e3aca0e8e86a00ed869ca"),
    "piqa/llm/train_CoT_23.json": (287857, "da10c54f4aae91d6e67328ccffc589b364442d0f122f2999d6cf29a723b2b0b8"),
    "piqa/llm/train_CoT_24.json": (264308, "8e9fd0c999d03b1c76bab496d74b309a51ffe3bb52d4c5fecceba7762313d4dd"),
    "piqa/llm/train_CoT_25.json": (271030, "8d81b25d9e7662ca4092a53b7fbd77cf28f29308d079fec9e8d10168d04e71f8"),
    "piqa/llm/train_CoT_26.json": (279846, "b085e1f33689f41caa9e07d6a3f9d780ed6ab4f59ce3ba72c2a30f5f7256e91a"),
    "piqa/llm/train_CoT_27.json": (288322, "753aa0fad76ce39955f3f1273ea6f9c628d6532bbb08d9f5652cd683a6ff050a"),
    "piqa/llm/train_CoT_28.json": (274203, "51c7569cac625aa20468128bac5225afb5f2129ea14fa5a25e4a6d434d2c1a71"),
    "piqa/llm/train_CoT_29.json": (280983, "7266307024c3d1c1baff7dd268b6878a73c9a434fb2eb2b7b249dcb3fc8684fe"),
    "piqa/llm/train_CoT_30.json": (274517, "dc6a619abdb888506f2c3b86a691fb3842d3ee2d15e2a1b0b823afe0877f6674"),
    "piqa/llm/train_CoT_31.json": (293786, "03c257d33ee0478acd99cd919231733d2a7bca220156fb89d05be37dbdf7bc71"),
    "piqa/llm/train_CoT_32.json": (66719, "99c19d720f9b3c403935bb1994a13bfc9d69a5313c894805cbffbf2a3703c224"),
    "piqa/llm/valid_CoT_0.json": (272902, "0ec61d7efd96a6e2312edb651ecb9165b5f107f9058ee26df22c940e1f7d18d0"),
    "piqa/llm/valid_CoT_1.json": (224828, "e4e2c5e6d69d28e5bd0083ffbc6534000706fe5c2b5fb87939b65ba821f15acc"),
    "pubmedqa/pubmedqa_test.json": (646420, "24e971aa35222968be5be9ec2f7a17957be391dacd96b9cc612ca2eb1c7aff7b"),
    "pubmedqa/pubmedqa_train.json": (820034, "789c986c96113014775d505087a8587bed2e180e9f6b3f8ee8ee25eed9e925f1"),
    "pubmedqa/pubmedqa_valid.json": (164063, "dc75cdc70d569141cd32f07fa36d6f0d5af175cca994116fe3d37ce5ff1bf8e9"),
    "pubmedqa/llm/test_CoT_0.json": (866608, "9b8d97720919bec36389ffcab3d48e60e725b7b0be293e345dd12d6d9bd04e0e"),
    "pubmedqa/llm/train_CoT_0.json": (1191650, "eb7dde8013223ec50efd122ac20df47f3c68a8986a16a29cd9c6aebc0cf9dad0"),
    "pubmedqa/llm/valid_CoT_0.json": (242542, "131ee244e629406a86fac0031449f8e8224d0779ab4ad3e7060534149eae5df5"),
    "riddle/riddle_test.json": (180384, "85d8a8df618c46bf564842f8d6ed72426471e3bae491f42f24f227db0b2c2846"),
    "riddle/riddle_train.json": (1264991, "5433b400d1e032e59a1e0f0e415ca02b73e6b2201e01e72bd5c9d16c872fd8ff"),
    "riddle/riddle_valid.json": (177768, "834a457613fbbdc33ee382bfb41810df58a6595a56b4a253e8292aa02a49ffae"),
    "riddle/llm/test_CoT_0.json": (359913, "23dabfd7a2ff320b0ca60ea5886f887134d20e038a5f0d698397407fc26070a1"),
    "riddle/llm/test_CoT_1.json": (9025, "9d673168d1f499c2bfb2e807d8f88b687d1d10d021604d0d893cc5986a752a0d"),
    "riddle/llm/train_CoT_0.json": (332235, "c1745e139928a96aa5318717ea9373b259b512562b3f99a29052f444552dfe63"),
    "riddle/llm/train_CoT_1.json": (340387, "9fba4955251cc49dcb72c9d969239bf497e8883e71d1cafeac745201b1e094aa"),
    "riddle/llm/train_CoT_2.json": (349967, "db9f720c06a9dcd249b05e08b94cf179d6ae5236a51ed4b4317befa3e7e9d833"),
    "riddle/llm/train_CoT_3.json": (340336, "73a7e15e84e189cc7d8c18f32c3c347c72c669dd943e7a935afd63108ce47e4a"),
    "riddle/llm/train_CoT_4.json": (325695, "ee60b194b2730dadf6cc42073121e75e66695aa2a622cd845dd54859391843f2"),
    "riddle/llm/train_CoT_5.json": (335708, "828e137895f0bd4958bec2e0c9fa0d9dfb8ea8ad36248cc4733d2eda8f5f9cc4"),
    "riddle/llm/train_CoT_6.json": (317897, "32c38cb0ee2bc9cbaf81158b76c8ce02831773b4bf68a554ab075615df6b9b2b"),
    "riddle/llm/train_CoT_7.json": (6764, "286e3b6f72fef34e47a8659fe2bea4073a3f166bb494e4fa0122375e5b85f69a"),
    "riddle/llm/valid_CoT_0.json": (328679, "62e89ec3f5d8d787d37358734072f1b985d70f96d84f77afe3a8abf3968ecb75"),
    "riddle/llm/valid_CoT_1.json": (7195, "8ea1165482c98ce5ec6dc11e7dc345bb2efec665da9981abd2258aa1f0aabd88"),
}
PIQA_TRAIN = "piqa/piqa_train.json"
PIQA_TRAIN_GIT_BLOB = "5009dbe551a9eb1014224f303f871ffcffb65e0e"  # git blob id at the release commit
PIQA_TRAIN_STAND_IN = "piqa/piqa_train.reconstructed.json"
LOCK_NAME = ".download.lock"  # in the data folder: serialises downloads between processes


class DownloadError(UserError):
    """A file could not be fetched or failed its checksum; the message names file and URL. `status`
    is the HTTP status when the server answered with an error, else None."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class _NotFound(DownloadError):
    """HTTP 404 / missing from a folder: the only failure that lets PIQA's stand-in replace its train file."""



@dataclass(frozen=True)
class Example:
    id: str
    question: str
    options: tuple[str, ...]
    answer: int  # index into options

    @property
    def answer_text(self) -> str:
        return self.options[self.answer]


# ----------------------------------------------------------------------------- checksums

def git_blob_sha1(path: Path) -> str:
    """`git hash-object` of a file: sha1 over b"blob <size>\\0" + bytes."""
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_problem(path: Path, rel: str) -> str | None:
    """None when `path` is the pinned release file `rel`, else what is wrong with it."""
    if rel == PIQA_TRAIN:
        got = git_blob_sha1(path)
        return None if got == PIQA_TRAIN_GIT_BLOB else f"git blob id {got}, expected {PIQA_TRAIN_GIT_BLOB}"
    size, sha256 = PINNED[rel]
    if path.stat().st_size != size:  # cheap check first
        return f"size {path.stat().st_size} bytes, expected {size}"
    got = file_sha256(path)
    return None if got == sha256 else f"sha256 {got}, expected {sha256}"


# ----------------------------------------------------------------------------- download

def source_url() -> str:
    return os.environ.get("TINYLLM_DATA_URL") or DEFAULT_URL


def _join(base: str, rel: str) -> str:
    return base.rstrip("/") + "/" + rel


def _local_root(base: str) -> Path | None:
    """The folder behind a file:// URL or a plain path; None for http(s)."""
    scheme = urllib.parse.urlsplit(base).scheme
    if scheme in ("http", "https"):
        return None
    if scheme == "file":
        return Path(urllib.request.url2pathname(urllib.parse.urlsplit(base).path))
    return Path(base)


def _copy_local(src: Path, part: Path, url: str, rel: str) -> None:
    if not src.is_file():
        raise _NotFound(f"{rel}: not found at {url}")
    with open(src, "rb") as fin, open(part, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


def http_download(url: str, part: Path, what: str, session: requests.Session | None = None,
                  offline_hint: str = "") -> tuple[bool, Mapping[str, str]]:
    """Stream `url` into `part`, resuming a leftover `part` with a Range request. Returns (whether the
    bytes already in `part` were kept, the response headers). Raises DownloadError naming `what` and
    the URL (_NotFound for a 404); `part` keeps what arrived, so a later call resumes it. Shared by the
    dataset files and the hub checkpoints (download_file, below). `offline_hint` ends the message of a
    connection that failed (no network: what to do instead)."""
    offset = part.stat().st_size if part.exists() else 0
    # identity: Content-Length and Range must count the bytes we store, not gzip-compressed ones
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        with (session or requests).get(url, headers=headers, stream=True, timeout=(15, 60)) as response:
            if response.status_code == 416:  # the .part is not a prefix we can extend: start over
                part.unlink()
                return http_download(url, part, what, session, offline_hint)
            if response.status_code == 404:
                raise _NotFound(f"{what}: HTTP 404 from {url}", 404)
            if response.status_code not in (200, 206):
                raise DownloadError(f"{what}: HTTP {response.status_code} {response.reason} from {url}",
                                    response.status_code)
            resumed = response.status_code == 206
            if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                part.unlink()  # a server that resumes elsewhere: the next attempt starts from byte 0
                raise DownloadError(f"{what}: bad Content-Range {response.headers.get('Content-Range')!r} "
                                    f"for Range bytes={offset}- from {url}")
            expected = response.headers.get("Content-Length")
            expected = int(expected) if expected and "Content-Encoding" not in response.headers else None
            received = 0
            # shown only for a file that takes more than a couple of seconds (the dataset files do not)
            progress = Progress(what, expected, unit="B", delay=2.0)
            with open(part, "ab" if resumed else "wb") as f:
                # small chunks: a connection that breaks loses at most one, the rest is resumed
                for chunk in response.iter_content(1 << 16):
                    f.write(chunk)
                    received += len(chunk)
                    progress.update(len(chunk))
                progress.close()
                f.flush()
                os.fsync(f.fileno())
    except requests.RequestException as e:  # connection reset, IncompleteRead, timeouts
        raise DownloadError(f"{what}: download from {url} failed: {request_problem(e)}{offline_hint}") from e
    if expected is not None and received != expected:
        raise DownloadError(f"{what}: truncated body from {url}: got {received} of {expected} bytes")
    if offset and resumed:
        log.info("resumed %s at byte %d from %s", what, offset, url)
    return resumed, response.headers


def request_problem(error: requests.RequestException) -> str:
    """requests' message nests urllib3's (a paragraph); the OS's reason is what the user needs."""
    reason = re.search(r"\[Errno -?\d+\] [^'\")]*", str(error))  # e.g. [Errno 111] Connection refused
    return f"{type(error).__name__}: {reason.group(0) if reason else str(error)[:300]}"


OFFLINE_HINT = ("; with no network, point TINYLLM_DATA_URL at a local copy of the release's datasets/ folder "
                "(a folder or file:// URL)")


def _fetch_one(rel: str, dest: Path, base: str) -> None:
    """Fetch `rel` from `base` into `dest` atomically: .part, fsync, checksum, os.replace."""
    url = _join(base, rel)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    local = _local_root(base)
    for attempt in range(2):
        try:
            # Ctrl-C keeps the .part: the next run resumes it with a Range request
            with on_stop(f"the partial download {part} is kept and resumed by the next run", failed_writes=False):
                if local is not None:
                    _copy_local(local / rel, part, url, rel)
                    resumed = False
                else:
                    resumed, _ = http_download(url, part, rel, offline_hint=OFFLINE_HINT)
            problem = checksum_problem(part, rel)
        except (DownloadError, OSError) as error:
            part.unlink(missing_ok=True)  # no partial file left behind an error we can see (a full disk too)
            if isinstance(error, OSError) and error.filename is None:
                error.filename = str(part)  # a failed write names no file by itself
            raise
        if problem is None:
            os.replace(part, dest)
            return
        part.unlink()
        if not (resumed and attempt == 0):  # a stale .part may be to blame: one clean restart
            raise DownloadError(f"{rel}: checksum mismatch for {url}: {problem}; the source does not hold the "
                                f"release's file: point TINYLLM_DATA_URL at a copy of the release (or unset it)")
        log.warning("%s: resumed download failed its checksum (%s); fetching again from byte 0", rel, problem)


def fetch(rel: str, data_dir: str | Path = "data", base_url: str | None = None) -> Path:
    """One release file (`rel` = path under datasets/, e.g. "arc/arc_train.json") into data_dir,
    verified; a present, verified file is not fetched again. PIQA's train file falls back to the
    pinned stand-in when the source lacks it (404); the returned path then names the stand-in."""
    if rel not in PINNED and rel != PIQA_TRAIN:
        raise ValueError(f"{rel}: not a file of the TinyLLM release (see data.PINNED)")
    data_dir = Path(data_dir)
    dest = data_dir / rel
    present = [(dest, rel)]
    if rel == PIQA_TRAIN:  # the original wins; a stand-in fetched earlier is accepted as well
        present.append((data_dir / PIQA_TRAIN_STAND_IN, PIQA_TRAIN_STAND_IN))

    def verified() -> Path | None:
        return next((path for path, name in present if path.is_file() and checksum_problem(path, name) is None), None)

    if found := verified():
        return found
    base = base_url or source_url()
    if dest.is_file():  # a damaged or edited copy: say so, since the download below may fail as well
        log.warning("%s fails its checksum (%s); fetching it again from %s", dest, checksum_problem(dest, rel),
                    _join(base, rel))
    data_dir.mkdir(parents=True, exist_ok=True)
    # one downloader per data folder (torchrun ranks share it); flock is dropped when a process dies
    with open(data_dir / LOCK_NAME, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if found := verified():  # another process fetched it while we waited
            return found
        try:
            _fetch_one(rel, dest, base)
        except _NotFound:
            if rel != PIQA_TRAIN:
                raise
            log.warning("%s is not at %s; using the pinned stand-in %s instead (PIQA's official train split, "
                        "questions/choices recovered from the release's rationale files; trailing spaces of "
                        "choices may be lost)", PIQA_TRAIN, _join(base, PIQA_TRAIN), PIQA_TRAIN_STAND_IN)
            _fetch_one(PIQA_TRAIN_STAND_IN, data_dir / PIQA_TRAIN_STAND_IN, base)
            return data_dir / PIQA_TRAIN_STAND_IN
    return dest


def split_file(dataset: str, split: str) -> str:
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)} "
                        "(--dataset, DATASET= for make)")
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return f"{dataset}/{dataset}_{split}.json"


def rationale_files(dataset: str, split: str) -> list[str]:
    """The release's llm/{split}_CoT_{k}.json files, k = 0, 1, ... in order."""
    prefix = f"{dataset}/llm/{split}_CoT_"
    files = [rel for rel in PINNED if rel.startswith(prefix)]
    return sorted(files, key=lambda rel: int(rel[len(prefix):-len(".json")]))


# ----------------------------------------------------------------------------- reading

def _rows(path: Path) -> list[tuple[str, object]]:
    """(where, row) pairs from a JSON list or JSON lines file; `where` names the row for errors."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None  # JSON lines (obqa), or broken JSON: reported line by line below
    if isinstance(data, list):
        return [(f"row {i}", row) for i, row in enumerate(data)]
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"row {len(rows)} (line {lineno})", json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {lineno}: not JSON ({e.msg}) and the file is not one JSON list")
    return rows


def read_examples(path: str | Path) -> list[Example]:
    """Read and validate a split file: every row needs an id, a non-empty question, at least two
    non-empty options, and an answer text equal to exactly one option. Errors (UserError) name the file,
    the row and the field."""
    path = Path(path)
    rows = _rows(path)
    if not rows:
        raise UserError(f"{path}: no examples")
    examples, seen = [], set()
    for where, row in rows:
        def bad(problem: str) -> UserError:
            ident = f" (id {row['id']!r})" if isinstance(row, dict) and "id" in row else ""
            return UserError(f"{path}: {where}{ident}: {problem}")

        if not isinstance(row, dict):
            raise bad(f"expected an object, got {type(row).__name__}")
        missing = [key for key in ("id", "question", "choices", "answer") if key not in row]
        if missing:
            raise bad(f"missing field(s) {', '.join(missing)}")
        ident, question, options, answer = row["id"], row["question"], row["choices"], row["answer"]
        if isinstance(ident, bool) or not isinstance(ident, (str, int)) or str(ident) == "":
            raise bad("id must be a non-empty string or an integer")
        if str(ident) in seen:
            raise bad("duplicate id")
        if not isinstance(question, str) or not question.strip():
            raise bad("question must be a non-empty string")
        if not isinstance(options, list) or len(options) < 2:
            raise bad("choices must be a list of at least 2 options")
        for i, option in enumerate(options):
            if not isinstance(option, str) or not option.strip():
                raise bad(f"choice {i} must be a non-empty string, got {option!r}")
        if not isinstance(answer, str):
            raise bad(f"answer must be the text of one choice, got {answer!r}")
        matches = [i for i, option in enumerate(options) if option == answer]
        if len(matches) != 1:
            raise bad(f"answer {answer!r} matches {len(matches)} of the choices {options!r}, expected exactly 1")
        seen.add(str(ident))
        examples.append(Example(str(ident), question, tuple(options), matches[0]))
    return examples


def load_split(dataset: str, split: str, data_dir: str | Path = "data", limit: int | None = None) -> list[Example]:
    """A split as released (downloaded and verified if needed); limit = the first N (0/None: all)."""
    if limit is not None and limit < 0:  # a negative slice would silently drop the last examples
        raise UserError(f"--limit={limit}: must be >= 0 (0 = every example; LIMIT= for make)")
    path = fetch(split_file(dataset, split), data_dir)
    if path.name == Path(PIQA_TRAIN_STAND_IN).name:
        log.warning("piqa train: reading the stand-in %s, not the release's original file", path)
    examples = read_examples(path)
    return examples[:limit] if limit else examples


def stable_hash(*parts: object) -> int:
    """A hash that is the same in every process and Python version (unlike hash() of a str)."""
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def train_subset(train: list[Example], fraction: float, seed: int = 0) -> list[Example]:
    """The paper's Figure 2: a seeded `fraction` of train (12.5% ... 100%), kept in file order. Ranking
    by stable_hash(seed, id) makes smaller fractions subsets of larger ones for the same seed."""
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"--train_fraction={fraction}: must be in (0, 1]")
    if fraction == 1.0:
        return list(train)
    keep = max(1, round(fraction * len(train)))
    chosen = set(sorted(range(len(train)), key=lambda i: stable_hash(seed, train[i].id))[:keep])
    return [example for i, example in enumerate(train) if i in chosen]


def in_context_examples(example: Example, pool: list[Example], k: int = 2, seed: int = 0) -> list[Example]:
    """§3.2: k in-context examples from `pool` (the dataset's train split), never `example` itself,
    drawn by stable_hash(seed, example.id, draw) so every teacher (and every run) sees the same ones
    for the same pool. Cost O(k), so building prompts for a whole train split stays linear."""
    candidates = sum(other.id != example.id for other in pool)
    if k > candidates:
        raise UserError(f"--k={k} in-context examples, but the pool has only {candidates} other examples: lower --k")
    chosen: list[Example] = []
    ids = {example.id}
    draw = 0
    while len(chosen) < k:
        other = pool[stable_hash(seed, example.id, draw) % len(pool)]
        draw += 1
        if other.id not in ids:
            ids.add(other.id)
            chosen.append(other)
    return chosen


def load_release_rationales(dataset: str, split: str, data_dir: str | Path = "data") -> list[str]:
    """The release's raw teacher strings for a split, in split-file order (prompts.parse_release
    splits each into the FLAN-T5-xl and LLaMA-2 rationales)."""
    raws: list[str] = []
    for rel in rationale_files(dataset, split):
        path = fetch(rel, data_dir)
        batch = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(batch, list) or not all(isinstance(raw, str) for raw in batch):
            raise UserError(f"{path}: expected a JSON list of strings")
        raws += batch
    n = len(load_split(dataset, split, data_dir))
    if len(raws) != n:
        raise UserError(f"{dataset}/llm/{split}_CoT_*.json hold {len(raws)} rationales but the {split} "
                        f"split has {n} examples: they must align by position")
    return raws


# ----------------------------------------------------------------------------- checkpoints: hub download and loading

HUB_ID = re.compile(r"^([\w.-]+)/([\w.-]+)(?:@([\w.-]+))?$")
HUB_CONFIG = "config.json"
HUB_OPTIONAL = ("generation_config.json", "spiece.model", "tokenizer.model", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
TOKENIZER_FILES = ("spiece.model", "tokenizer.model", "tokenizer.json")
DOWNLOAD_ATTEMPTS = 4


def tinyllm_home() -> Path:
    return Path(os.environ.get("TINYLLM_HOME") or Path.home() / ".cache" / "tinyllm")


def resolve_model(source: str) -> Path:
    """A local folder as is; a hub id `org/name[@revision]` (revision default `main`) is downloaded
    once, with requests, from HF_ENDPOINT (default https://huggingface.co) with HF_TOKEN, into
    $TINYLLM_HOME/hub/<org>--<name>/<revision>/ and read from there afterwards, offline."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    match = HUB_ID.match(source)
    if match is None:
        raise UserError(f"model {source!r}: not a folder, and not a hub id org/name[@revision]")
    org, name, revision = match.group(1), match.group(2), match.group(3) or "main"
    folder = tinyllm_home() / "hub" / f"{org}--{name}" / revision
    if (folder / ".complete").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # torchrun ranks asking for the same model: one downloads
        if not (folder / ".complete").exists():
            download_snapshot(f"{org}/{name}", revision, folder)
    return folder


def download_snapshot(repo: str, revision: str, folder: Path) -> None:
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    session = requests.Session()
    if os.environ.get("HF_TOKEN"):
        # requests drops this header on a redirect to another host (the hub's CDN), as it should
        session.headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    what = f"{repo}@{revision}"

    def fetch(filename: str, required: bool) -> bool:
        url = f"{endpoint}/{repo}/resolve/{revision}/{filename}"
        return download_file(session, url, folder / filename, required, what)

    fetch(HUB_CONFIG, required=True)
    for filename in HUB_OPTIONAL:
        fetch(filename, required=False)
    if not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise UserError(f"{what}: no tokenizer file (one of {', '.join(TOKENIZER_FILES)}) on {endpoint}")
    if fetch("model.safetensors.index.json", required=False):
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shards = sorted(set(index.get("weight_map", {}).values()))
        bad = [s for s in shards if Path(s).name != s or not s.endswith(".safetensors")]
        if not shards or bad:
            raise UserError(f"{what}: model.safetensors.index.json has a bad weight_map (shards {bad or shards})")
        for shard in shards:
            fetch(shard, required=True)
    elif not fetch("model.safetensors", required=False):
        raise UserError(f"{what}: neither model.safetensors nor model.safetensors.index.json on "
                        f"{endpoint} (only safetensors checkpoints are read)")
    atomic_write(folder / ".complete", json.dumps({"repo": repo, "revision": revision,
                                                   "endpoint": endpoint}).encode())


def expected_sha256(headers: Mapping[str, str]) -> str | None:
    """The hub sends the sha256 of large (LFS) files as X-Linked-Etag / ETag."""
    for key in ("X-Linked-Etag", "ETag"):
        value = headers.get(key, "").removeprefix("W/").strip('"')
        if re.fullmatch(r"[0-9a-f]{64}", value):
            return value
    return None


def download_file(session: requests.Session, url: str, dest: Path, required: bool, what: str) -> bool:
    """`url` into `dest` through http_download (a `.part` file resumed with Range requests);
    os.replace makes the file appear only when complete. Connection errors, truncated bodies and 5xx
    are retried, resuming where the last attempt stopped. False for a 404 on an optional file."""
    if dest.exists():  # an interrupted snapshot: files that exist are complete
        return True
    part = dest.with_name(dest.name + ".part")
    for attempt in range(DOWNLOAD_ATTEMPTS):
        if attempt:
            time.sleep(0.5 * 2 ** (attempt - 1))
        try:
            _, headers = http_download(url, part, f"{what}: {dest.name}", session)
        except DownloadError as e:
            if e.status == 404:
                if not required:
                    return False
                raise UserError(f"{what}: {dest.name} not found (404 from {url}); check the model id "
                                f"(and HF_ENDPOINT)") from e
            if e.status in (401, 403):
                raise UserError(f"{what}: access denied ({e.status} from {url}); gated or private "
                                "models need HF_TOKEN set to a token with access") from e
            problem = str(e)
            continue
        sha256 = expected_sha256(headers)
        if sha256 is not None and file_sha256(part) != sha256:
            part.unlink()
            raise UserError(f"{what}: {dest.name} does not match the sha256 {sha256} the server sent")
        os.replace(part, dest)
        fsync_path(dest.parent)
        return True
    raise UserError(f"{what}: download of {url} failed after {DOWNLOAD_ATTEMPTS} attempts: {problem}")




JSON_FILES = ("config.json", "model.safetensors.index.json", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json")


def read_json(path: Path) -> object:
    """A JSON file of a model folder, or a UserError naming it and what is wrong (not UTF-8, not JSON)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a JSON file (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON ({e.msg} at line {e.lineno} column {e.colno}; truncated or damaged)") from None


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file, from its header alone (None: whole): an 8-byte little-endian
    header length, a JSON header, and tensor data that covers the rest of the file exactly."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a header"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return f"a header of {length} bytes in a file of {size}"
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "its header is not JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"
            and isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2]
    if len(ends) != len([key for key in header if key != "__metadata__"]):
        return "a tensor entry without data_offsets"
    data_size = size - 8 - length
    if max(ends, default=0) != data_size:
        return f"the header places {max(ends, default=0)} bytes of tensor data, the file holds {data_size}"
    return None


def check_model_files(folder: Path) -> dict:
    """Before a model folder is loaded: every file it has is parsed (config.json, the safetensors index, each
    safetensors file's header, the tokenizer's JSON files), so that a damaged one is named with what is wrong
    with it. Returns config.json."""
    config = read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise UserError(f"{folder / 'config.json'}: not a JSON object")
    for name in JSON_FILES[1:]:
        if (folder / name).is_file():
            read_json(folder / name)
    for path in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise UserError(f"{path}: truncated or not a safetensors file ({problem}); download or copy it again")
    return config


def check_model_source(source: str, what: str) -> None:
    """Before any work: `source` is a model folder whose files parse (check_model_files), or a hub id (downloaded
    when the model is loaded). `what` names the flag (--student)."""
    folder = Path(source).expanduser()
    if folder.is_dir() and (folder / "config.json").is_file():
        check_model_files(folder)
    elif not folder.is_dir() and HUB_ID.match(source) is None:
        raise UserError(f"{what}={source}: not a folder, and not a hub id org/name[@revision]")


def load_model(source: str, dtype: torch.dtype = torch.float32,
               device: str = "cpu") -> tuple[nn.Module, object, str]:
    """(model, tokenizer, kind) for a hub id or folder: kind "t5" (t5.py) when config.json's
    model_type is t5, else "llama" (llama.py, which names the decoder-only types it reads); never
    guessed from the name."""
    folder = resolve_model(source)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise UserError(f"model {source!r}: {config_path} not found (not a Hugging Face model folder)")
    config = check_model_files(folder)
    kind = "t5" if config.get("model_type") == "t5" else "llama"
    model_cls, tokenizer_cls = (t5.T5, t5.Tokenizer) if kind == "t5" else (llama.Llama, llama.Tokenizer)
    config_cls = t5.T5Config if kind == "t5" else llama.LlamaConfig
    # t5.py and llama.py import nothing of ours and raise ValueError / FileNotFoundError about the
    # folder (its config, weights, keys, shapes, tokenizer): here, where the user's model enters,
    # they become UserErrors.
    try:
        config_cls.from_hf_config(config)
    except KeyError as e:  # a field the model needs
        raise UserError(f"{config_path}: missing key {e} (a {kind} config.json needs it)") from e
    except ValueError as e:  # an unsupported value: the model's own message names the field
        raise UserError(f"{config_path}: {e}") from e
    except TypeError as e:  # a value of the wrong JSON type (a string for a number, ...)
        raise UserError(f"{config_path}: a value of the wrong type ({e})") from e
    try:
        model = model_cls.from_pretrained(folder, dtype=dtype, device=device)
    except ValueError as e:  # config values, keys, shapes
        raise UserError(f"{config_path}: {e}") from e
    except FileNotFoundError as e:  # no weights, a missing shard
        raise UserError(f"model {source!r}: {e}") from e
    try:
        tokenizer = tokenizer_cls.from_pretrained(folder)
    except ImportError as e:  # tokenizer.json needs the optional `tokenizers`; the message says how
        raise UserError(f"model {source!r}: {e}") from e
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"model {source!r}: no usable tokenizer: {e}; a checkpoint folder needs the tokenizer "
                        f"files of the model it was trained from (spiece.model, tokenizer.model or tokenizer.json)"
                        ) from e
    except RuntimeError as e:  # sentencepiece: "could not parse ModelProto from <file>"
        if "parse" not in str(e):
            raise
        raise UserError(f"model {source!r}: a tokenizer file cannot be parsed, truncated or damaged ({e})") from e
    return model, tokenizer, kind
