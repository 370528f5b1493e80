from .run import main

# Guarded: worker processes import the main module too, and must not start a benchmark of their own.
if __name__ == "__main__":
    main()
