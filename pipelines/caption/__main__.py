"""`python -m pipelines.caption ...`: see pipelines/caption/stage.py."""

from pipelines.caption.stage import main

if __name__ == "__main__":
    main()
