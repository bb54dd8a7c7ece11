"""Parameter counts equal the reference DualVGR's, total and per top-level module, for every
configuration in dualvgr_params.json (counted from NJUPT-MCC/DualVGR-VideoQA)."""
import json
import re
from pathlib import Path

import pytest

import variants

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "dualvgr_params.json"
REFERENCE_DOC = Path(__file__).resolve().parents[2] / "docs" / "reference.md"
CONFIGS = json.loads(GOLDEN.read_text())["configs"]


def test_the_reference_page_quotes_the_golden_counts():
    """docs/reference.md's table of the reference counts agrees with the golden file, row by row."""
    quoted = {}
    for line in REFERENCE_DOC.read_text().splitlines():
        m = re.match(r"\| (\d) units?, (\d) graph layers? .*\| ([\d,]+) \|$", line)
        if m:
            quoted[(int(m[1]), int(m[2]))] = int(m[3].replace(",", ""))
    golden = {(c["unit_layers"], c["graph_layers"]): c["params"] for c in CONFIGS
              if (c["question_vocab"], c["answer_vocab"], c["module_dim"]) == (4000, 1000, 768)}
    assert len(quoted) == 3 and all(golden[k] == v for k, v in quoted.items()), (quoted, golden)


@pytest.mark.parametrize("c", CONFIGS, ids=lambda c: "q{question_vocab}-a{answer_vocab}-d{module_dim}-c{num_clips}"
                         "-u{unit_layers}-g{graph_layers}".format(**c))
def test_param_counts(c):
    model = variants.create("dualvgr", **{k: c[k] for k in ("question_vocab", "answer_vocab", "vision_dim",
                                                             "module_dim", "word_dim", "num_clips",
                                                             "unit_layers", "graph_layers")})
    by_module = {n: sum(p.numel() for p in m.parameters()) for n, m in model.named_children()}
    assert by_module == c["params_by_module"]
    assert sum(p.numel() for p in model.parameters()) == c["params"]


def test_msvd_default_is_the_reference_23m():
    assert sum(p.numel() for p in variants.create("dualvgr").parameters()) == 23_187_578


def test_dualvgr_u2_is_what_the_official_train_py_builds():
    """The official train.py never passes unit_layers, so DualVGR's constructor default (2 units)
    applies: 27,792,523 parameters at the MSVD-QA setting. ``dualvgr`` is VQAKD's 1-unit model."""
    ref = next(c for c in CONFIGS if (c["question_vocab"], c["answer_vocab"], c["module_dim"], c["unit_layers"],
                                      c["graph_layers"]) == (4000, 1000, 768, 2, 1))
    model = variants.create("dualvgr-u2")
    assert model.cfg.unit_layers == 2 and model.cfg.graph_layers == 1
    assert {n: sum(p.numel() for p in m.parameters()) for n, m in model.named_children()} == ref["params_by_module"]
    assert sum(p.numel() for p in model.parameters()) == ref["params"] == 27_792_523
    assert variants.get_config("dualvgr").model["unit_layers"] == 1
