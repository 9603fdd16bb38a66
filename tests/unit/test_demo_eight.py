"""8-expert demo: each domain's train documents are split in two, with nothing lost and nothing shared."""

from experts.demo.eight import EXPERTS8, SUBDOMAINS
from gating.jobs import DEMO_EXPERTS, demo_experts

DOCS = {
    "code": [{"source": "numpy:numpy/linalg/linalg.py"}, {"source": "python-stdlib:json/decoder.py"},
             {"source": "vllm:vllm/engine/arg_utils.py"}],
    "prose": [{"source": "fortunes:fortunes#3"}, {"source": "debian-handbook:en-US/sect.apt.html#2"},
              {"source": "jargon-text:jargon.txt.gz#10"}],
    "math": [{"source": "mathgen#12"}, {"source": "sympy/polys/polytools.py#3"}],
    "json": [{"source": "botocore/data/s3/2006-03-01/service-2.json#0"}, {"source": "pycountry/databases/iso639-3.json#1"}],
}


def test_each_domain_splits_into_exactly_two_experts_covering_every_document():
    assert len(EXPERTS8) == 8
    for domain in DEMO_EXPERTS:
        halves = [name for name, (d, _) in SUBDOMAINS.items() if d == domain]
        assert len(halves) == 2
        for doc in DOCS[domain]:
            assert sum(SUBDOMAINS[h][1](doc) for h in halves) == 1, (domain, doc)
        assert all(any(SUBDOMAINS[h][1](doc) for doc in DOCS[domain]) for h in halves)


def test_a_demo_names_its_experts_in_its_manifest(tmp_path):
    assert demo_experts(tmp_path) == DEMO_EXPERTS
    (tmp_path / "manifest.json").write_text('{"experts": ["a", "b"]}')
    assert demo_experts(tmp_path) == ("a", "b")
