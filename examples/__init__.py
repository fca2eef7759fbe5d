"""Example domain specs shipped with harmprune (`harmprune harden --domain cyber`)."""
