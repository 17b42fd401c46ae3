"""The five tabs: each builds its components and wires its handlers (UI values -> one engine call)."""
