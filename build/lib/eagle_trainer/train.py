"""`python -m eagle_trainer.train` (the torchrun entry the README and recipes use) runs `eagle-train`:
the application lives in eagle_trainer/app/train.py."""

from eagle_trainer.app.train import main

if __name__ == "__main__":
    main()
