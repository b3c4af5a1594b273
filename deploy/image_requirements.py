"""What deploy/Dockerfile installs around the torch it already has, one requirement a line.

`python image_requirements.py PYPROJECT`: the build backend and the dependencies of
pyproject.toml, less torch and torchvision. `python image_requirements.py --installed`:
torch==V and torchvision==V as installed, the constraints that keep pip from replacing them.
"""

import re
import sys
from importlib.metadata import version

import tomllib

IN_THE_IMAGE_ALREADY = ("torch", "torchvision")

if sys.argv[1] == "--installed":
    for name in IN_THE_IMAGE_ALREADY:
        print(f"{name}=={version(name)}")
    sys.exit()

with open(sys.argv[1], "rb") as handle:
    project = tomllib.load(handle)
for requirement in [*project["build-system"]["requires"], *project["project"]["dependencies"]]:
    name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group(0)
    if name.lower() not in IN_THE_IMAGE_ALREADY:
        print(requirement)
