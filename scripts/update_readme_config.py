"""Rewrite README.md's configuration reference from the config dataclasses (`make docs`)."""

import re
from pathlib import Path

from pretrain.config import markdown_reference

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"

text = README.read_text()
new = re.sub(f"{re.escape(START)}.*?{re.escape(END)}", lambda _: f"{START}\n{markdown_reference()}{END}",
             text, flags=re.S)
README.write_text(new)
print("README.md config reference", "updated" if new != text else "already current")
