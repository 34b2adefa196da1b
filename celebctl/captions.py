"""Caption templates used while fitting an identity.

Each template holds one `{}` at its very end; during a fit it is filled with the subject phrase
"face of {subject} person", where the subject is the identity's two token slots. Two rules,
both from the reference method (docs/method.md, "Captions"):

- The subject phrase comes last. CLIP's text encoder is causal: words after the identity's
  vectors are computed from them, so a word placed after the subject during the fit would teach
  the identity to change what that word means.
- A caption describes nothing the training image lacks. The image is the face crop, flipped,
  recoloured and pasted at 10-100 % of the frame on black; a caption about a beach, the light,
  a background or other people would teach the identity to cancel those words, which are
  exactly what users write.

So the list below only varies the kind of picture and plain qualities of the photo itself. It is
celebctl's own list; tests/test_captions.py checks both rules for every template.
"""

from __future__ import annotations

SUBJECT_PHRASE = "face of {} person"

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a photo of the {}",
    "a picture of a {}",
    "a picture of the {}",
    "an image of a {}",
    "an image of the {}",
    "a photograph of a {}",
    "a snapshot of a {}",
    "a close-up photo of a {}",
    "a close-up photo of the {}",
    "a cropped photo of a {}",
    "a cropped photo of the {}",
    "a clear photo of a {}",
    "a sharp photo of the {}",
    "a good photo of a {}",
    "a good photo of the {}",
    "a nice photo of a {}",
    "a plain photo of a {}",
    "a simple photo of the {}",
    "a real photo of a {}",
    "a digital photo of a {}",
    "a color photo of a {}",
    "a bright photo of a {}",
    "a bright photo of the {}",
    "a dark photo of a {}",
    "a dark photo of the {}",
    "a small photo of a {}",
    "a large photo of the {}",
    "a recent photo of a {}",
    "a photo of one {}",
    "a photo showing a {}",
    "a photo showing the {}",
    "a portrait photo of a {}",
    "a headshot of a {}",
    "a rendition of a {}",
    "a rendition of the {}",
)

# Words that describe what the training image does not show (scenes, places, light, backgrounds,
# framing beyond the face, other people, actions). No template may contain them; the test that
# enforces the rules uses this list.
ABSENT_WORDS = frozenset(
    """beach park street city office home cafe stage garden wall window room outdoors indoors
    outside inside sun sunny night rain snow light lighting shadow shadows background backdrop
    camera side front shoulders body upper full frame lens 35mm 85mm depth field family group
    friends crowd together with smiling serious looking standing sitting walking wearing
    holding in at on by against""".split()
)
