"""`python -m tasks.rlhf [key=value ...]`: the rlhf stage (see tasks/rlhf/__init__.py)."""
from tasks.rlhf import main

main()
