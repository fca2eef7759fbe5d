"""`harmprune audit`: checking a hardened checkpoint someone else made (the checks), and measuring
its figures again (the rerun)."""
