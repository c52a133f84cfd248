"""`toucan eval`: BELLE's LLM-as-judge evaluation, end to end.

    generate.py   eval set -> answers.jsonl        (shared engine + template, batched, resumable)
    judge.py      answers  -> scores.jsonl          (BELLE judge messages, openai client, on-disk cache)
    parse.py      judge reply -> score in 0..1, or "unparseable" (never 0)
    reference.py  offline judge: character ROUGE-L against std_answer (not comparable with LLM scores)
    report.py     scores -> table (Markdown, CSV, JSON) + bar chart
    items.py      eval-set / prompt loading, class names, item ids, the answers/scores file format
"""
