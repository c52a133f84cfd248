"""The judge-score parser on replies in the forms real judges give (toucan.eval.parse)."""

import pytest

from toucan.eval.parse import parse_score

# (reply, expected score or None, expected status) with the default out_of_range="reject"
REPLIES = [
    ("得分：0.8", 0.8, "ok"),
    ("得分: 1", 1.0, "ok"),
    ("**得分**: 0.5分", 0.5, "ok"),
    ("得分:0.7/1", 0.7, "ok"),
    ("得分：1.0\n理由：模型回答与标准答案一致。", 1.0, "ok"),
    ("得分：0\n理由：回答错误。", 0.0, "ok"),                    # a real 0 stays a 0
    ("得分为0.6。理由如下……", 0.6, "ok"),
    ("得分是 0.9", 0.9, "ok"),
    ("最终得分：0.3", 0.3, "ok"),
    ("初步得分0.5，但考虑到步骤有误，最终得分为0.2", 0.2, "ok"),   # a 'final' label wins
    ("得分：0.8\n理由：若完全一致，得分应为1。", 0.8, "ok"),       # else the first labelled score
    ("得分：4/5", 0.8, "ok"),
    ("得分：80%", 0.8, "ok"),
    ("得分：８０％", 0.8, "ok"),                                 # full-width forms
    ("得分：０．６", 0.6, "ok"),
    ("得分： 【0.9】", 0.9, "ok"),
    ('得分："0.4"', 0.4, "ok"),
    ("Score: 0.75", 0.75, "ok"),
    ("score=0.2", 0.2, "ok"),
    ("分数：0.5", 0.5, "ok"),
    ("评分：1分", 1.0, "ok"),
    ("总分：0.9", 0.9, "ok"),
    ("0.8", 0.8, "ok"),                                          # a bare number is the score
    ("0.5分。", 0.5, "ok"),
    ("得分：.5", 0.5, "ok"),
    ("得分:\n0.7\n理由：……", 0.7, "ok"),
    ("得分：0.8分（满分1分）", 0.8, "ok"),
    ("**得分：0.6**\n\n**理由**：……", 0.6, "ok"),
    ("得分 : 1 / 1", 1.0, "ok"),
    ("得分：1.5", None, "out_of_range"),
    ("得分：8", None, "out_of_range"),
    ("得分：-0.2", None, "out_of_range"),
    ("得分：12/10", None, "out_of_range"),
    ("得分：0/0", None, "unparseable"),
    ("无法评分，模型没有回答问题。", None, "unparseable"),
    ("模型回答中国有34个省，与标准答案不符。", None, "unparseable"),  # numbers without a label
    ('请按照"得分:"这样的形式输出分数。', None, "unparseable"),
    ("得分：满分", None, "unparseable"),
    ("", None, "unparseable"),
    (None, None, "unparseable"),
]


def test_table_is_big_enough():
    assert len(REPLIES) >= 30


@pytest.mark.parametrize("reply,score,status", REPLIES)
def test_parse_score(reply, score, status):
    p = parse_score(reply)
    assert p.status == status
    if score is None:
        assert p.score is None  # never 0 for a reply without a valid score
    else:
        assert p.score == pytest.approx(score)


@pytest.mark.parametrize("reply,clamped,value", [("得分：1.5", 1.0, 1.5), ("得分：-1", 0.0, -1.0), ("得分：8", 1.0, 8.0)])
def test_clamp_mode(reply, clamped, value):
    p = parse_score(reply, out_of_range="clamp")
    assert (p.score, p.status, p.value) == (clamped, "clamped", value)
    assert parse_score("得分：0.4", out_of_range="clamp").status == "ok"
