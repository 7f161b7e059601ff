"""Words kept out of canaries: profanity, slurs and sexual terms (hashed, so the source does
not spell them out). A canary tool should not make a TTS voice say these."""

from __future__ import annotations

import hashlib

_BLOCKED = frozenset([
    '01b18434faa9', '0e553ea93148', '0e55d5d81a33', '0e56f4d8790f', '0e5e98b118c4',
    '0e66889c487b', '185368919008', '1d4c62487b0e', '1ecb2dd0cec4', '20cc8965c47e',
    '2561f60372bd', '25db0fdcb8bc', '26f5de8ac3a6', '2c82350076cb', '2cd033918158',
    '2e46f8d56572', '2eeb475b5f55', '37e90e52d1f4', '3a1a2f107aa0', '3bda8ffeef82',
    '431c4f3ab860', '438ed034be55', '4569aa20128e', '4a103c5b1bff', '4b05ce12fa4e',
    '4f9f764a5c58', '50eeb459d451', '51ad754d1b08', '51e3cfe8d2c8', '5527352cb27f',
    '587d000c23e8', '607a1c6e3dfa', '6276af483481', '6f10e75e9e70', '70c48bf85163',
    '70f2a5b0d326', '715b9d8577dc', '725fbabc16a1', '73139fb1568e', '7b31a9d4f152',
    '7cbe913fd81f', '8109f65e403b', '8c881c58dc1e', '8e236ca175d6', '9431c69de414',
    '9433e62d266f', '9eba73ee4d5d', 'a25c3cf681fb', 'a4149a6bc0f1', 'a6e45c0c82a5',
    'a8f9d9bd4338', 'a95c2bbce736', 'abcc55b02b08', 'ac6ee90fc3b6', 'ac9306574c2e',
    'b51478866d1f', 'b65e79168656', 'b7b712b99e71', 'b7c8cd9deab0', 'bb7dcf599868',
    'be3d3e9f490f', 'c1e67f63655b', 'c4a824938a78', 'c6597134c36d', 'ca20a7def80d',
    'd0d621c47858', 'd517d2ba03f4', 'd81baafc3143', 'da075443acc5', 'df1ea93f589c',
    'e331ccd5628e', 'e533a067cd5c', 'e7e9ee28e7d1', 'eb28ee5e0fa0', 'eee34e80631a',
    'f248d66d8d1f', 'f64f4f163f4d', 'fa0997f1d832',
])


def blocked(word: str) -> bool:
    return hashlib.blake2b(word.encode(), digest_size=6).hexdigest() in _BLOCKED
