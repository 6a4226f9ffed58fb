"""The tools (installed as ``chat_tools``). They run as scripts from this
folder and import each other by name (``harness``, ``procfs``): imported as a
package, they find each other the same way."""

import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
