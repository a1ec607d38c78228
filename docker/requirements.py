"""Print the project's dependencies from pyproject.toml, without torch (the image provides it), as a
pip requirements file: ``python docker/requirements.py [extra ...] > requirements.txt``."""

import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
wanted = list(project["dependencies"])
for extra in sys.argv[1:]:
    wanted += project["optional-dependencies"][extra]
print("\n".join(r for r in wanted if not r.replace(" ", "").startswith(("torch>", "torch=", "torch<", "torch;")) and r.strip() != "torch"))
