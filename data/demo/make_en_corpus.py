"""Writes data/demo/en_corpus/*.txt: English prose for the demo's base tokenizer and its stage-0
pre-training (configs/demo.py), one document per line.

Every sentence frame and word list below was written for this project; the documents are random
combinations of them (seeded, so the output is the same on every run). Run from the repository
root: `python data/demo/make_en_corpus.py` (rewrites the shipped files).
"""
from __future__ import annotations

import os
import random

NAMES = ["Mara", "Tobias", "Ines", "Kofi", "Lena", "Arjun", "Odette", "Rafael", "Yuki", "Hamid",
         "Greta", "Silas", "Noor", "Piotr", "Amara", "Declan", "Wren", "Matteo", "Saoirse", "Idris",
         "Beatrix", "Caleb", "Zofia", "Emeka", "Ruth", "Anselm", "Priya", "Florin", "Maeve", "Olu"]
TOWNS = ["Harrowgate", "Linden Vale", "Port Ashby", "Cold Ridge", "Millbrook", "Saltmarsh",
         "Elmstead", "Greyhaven", "Thornbury", "Kestrel Bay", "Oakhollow", "Fennwick",
         "Stonemere", "Brightwater", "Marlow Cross", "Quillford"]
SEASONS = ["spring", "summer", "autumn", "winter"]
TIMES = ["early in the morning", "just after noon", "late in the afternoon", "at dusk",
         "long after dark", "before breakfast", "on a quiet Sunday", "during the first week of the "
         "month", "on the last day of the season", "while the streets were still empty"]
WEATHER = ["a thin rain was falling", "the wind came hard off the hills", "the sky was a flat grey",
           "the sun sat low and bright", "fog hung over the water", "the air smelled of cut grass",
           "frost still covered the fences", "a warm breeze moved through the trees",
           "clouds piled up in the west", "the evening was mild and still"]
FEELINGS = ["curious", "tired but content", "a little nervous", "unexpectedly calm", "impatient",
            "cheerful", "thoughtful", "proud", "uneasy", "relieved"]

TOPICS: dict[str, dict[str, list[str]]] = {
    "garden": {
        "things": ["tomatoes", "runner beans", "lettuces", "sunflowers", "raspberry canes",
                   "onions", "marigolds", "young apple trees", "potatoes", "herbs in clay pots",
                   "climbing roses", "pumpkins"],
        "tools": ["a spade", "a watering can", "a wheelbarrow", "an old rake", "a pair of shears",
                  "a trowel", "a length of twine", "a bucket of compost"],
        "frames": [
            "{name} spent most of the {season} looking after the {thing} behind the house.",
            "The {thing} needed water every second day, and {name} carried {tool} down the path "
            "without complaint.",
            "Nobody had told {name} that {thing} grow best when the soil is loose and dark.",
            "By the end of the week the {thing} had doubled in size, which surprised everyone.",
            "Snails are patient creatures, and they found the {thing} long before {name} did.",
            "A good gardener watches the weather more closely than the calendar.",
            "{name} kept a small notebook in which every planting date was written in pencil.",
            "When {weather}, the whole garden seemed to hold its breath.",
            "The neighbours came to admire the {thing}, and some of them left with a bag full.",
            "Weeds, {name} decided, are simply plants that arrive without being invited.",
            "The secret, an old man once said, is to plant a little more than you need and give "
            "the rest away.",
            "It took three tries and {tool} before the bed was finally ready for the {thing}.",
        ],
    },
    "kitchen": {
        "things": ["bread", "lentil soup", "a plum tart", "fried rice", "pancakes", "a pot of stew",
                   "roasted carrots", "a lemon cake", "dumplings", "tomato sauce", "oat biscuits",
                   "a fish pie"],
        "tools": ["a heavy iron pan", "a wooden spoon", "a chipped mixing bowl", "a sharp knife",
                  "the old oven", "a set of scales", "a rolling pin", "a clean tea towel"],
        "frames": [
            "{name} learned to make {thing} from a recipe that was mostly crossed out.",
            "The trick with {thing} is to be patient and to keep the heat low.",
            "Flour covered the table, the floor and, somehow, the top of the cupboard.",
            "Every Friday the kitchen in {town} smelled of {thing} and strong coffee.",
            "{name} reached for {tool} and began, as always, by washing everything twice.",
            "Salt, a little butter and enough time will rescue almost any dish.",
            "The first attempt at {thing} was a quiet disaster, and the second was not much better.",
            "Guests arrived early, so {name} handed them {tool} and put them to work.",
            "A recipe is only a suggestion, {name} liked to say, and the cook has the final word.",
            "By the time the {thing} was ready, the children had already set the table.",
            "Nothing was measured exactly, yet the result tasted the same every year.",
            "{name} wrote the method on a card and pinned it above the sink for next time.",
        ],
    },
    "railway": {
        "things": ["the morning train", "the night express", "a slow local service",
                   "the coastal line", "a freight train loaded with timber", "the branch line",
                   "the last train of the day", "an old steam engine"],
        "tools": ["a paper ticket", "a heavy suitcase", "a flask of tea", "a timetable",
                  "a folded map", "a borrowed umbrella", "a small notebook", "a bag of apples"],
        "frames": [
            "{name} caught {thing} to {town} with {tool} and very little idea of what came next.",
            "The platform was crowded, and the announcements were impossible to hear.",
            "Outside the window, fields gave way to woods and then to a wide grey river.",
            "{thing} was twenty minutes late, which in {town} counts as being on time.",
            "A conductor with a kind face checked every ticket twice and smiled each time.",
            "The carriage rocked gently, and half the passengers were soon asleep.",
            "{name} counted the stations on the map and found there were more than expected.",
            "Rail travel rewards people who are not in a hurry.",
            "At the junction the train waited while {weather}.",
            "Somebody had left {tool} on the luggage rack, and nobody ever came back for it.",
            "The line was built more than a century ago, mostly by hand.",
            "When the train finally pulled into {town}, {name} felt {feeling}.",
        ],
    },
    "library": {
        "things": ["an atlas", "a book of old letters", "a history of the town", "a field guide to "
                   "birds", "a collection of short stories", "a dictionary with a broken spine",
                   "a volume of poems", "a manual for repairing clocks", "a cookbook from another "
                   "century", "a novel nobody had borrowed in years"],
        "tools": ["a library card", "a pencil", "a stack of index cards", "a magnifying glass",
                  "a canvas bag", "a reading lamp"],
        "frames": [
            "The library in {town} was small, but it had {thing} that no other place could offer.",
            "{name} found {thing} on the bottom shelf, hidden behind a row of encyclopaedias.",
            "Reading rooms are quiet in a way that ordinary rooms never manage to be.",
            "The librarian knew where every book was, even the ones that were missing.",
            "{name} brought {tool} and stayed until the lights were switched off.",
            "Someone had written careful notes in the margins of {thing}.",
            "A single good question can send a reader through a dozen different books.",
            "Outside, {weather}, but nobody in the reading room noticed.",
            "Borrowing {thing} felt like being trusted with something valuable.",
            "The oldest books smelled of dust, glue and something a little like vanilla.",
            "{name} returned the book a week late and paid the fine without argument.",
            "Every town deserves a place where anyone may sit and read for free.",
        ],
    },
    "sea": {
        "things": ["a small fishing boat", "the harbour wall", "a lighthouse", "the tide pools",
                   "a wooden jetty", "a line of moored yachts", "the breakwater", "a sandbar"],
        "tools": ["a coil of rope", "a pair of oars", "a tin of bait", "a compass", "a net",
                  "a lantern", "oilskin coats", "a pocket knife"],
        "frames": [
            "{name} grew up in {town}, where the sea decides most things.",
            "At low tide the children searched {thing} for crabs and smooth stones.",
            "The fishermen left before dawn, carrying {tool} and very few words.",
            "From {thing} you could see the weather coming an hour before it arrived.",
            "Gulls argued loudly over every scrap that fell from the boats.",
            "The water looked calm, but the old sailors knew better than to trust it.",
            "{name} rowed out past {thing} while {weather}.",
            "Salt gets into everything by the sea: clothes, hinges and even handwriting.",
            "In {season} the storms are long, and the harbour fills with sheltering boats.",
            "A good catch meant a good week, and a poor one meant mending nets instead.",
            "The keeper of the light wrote down the wind speed every four hours.",
            "Coming home, {name} felt {feeling} and smelled strongly of fish.",
        ],
    },
    "workshop": {
        "things": ["a broken chair", "a clock that had stopped", "a bicycle with a bent wheel",
                   "an old radio", "a wooden chest", "a leaking kettle", "a sewing machine",
                   "a set of kitchen shelves", "a garden gate", "a pair of leather boots"],
        "tools": ["a screwdriver", "a tin of oil", "a hand drill", "sandpaper", "a soldering iron",
                  "wood glue", "a spirit level", "a box of mismatched screws"],
        "frames": [
            "{name} opened the workshop every morning and started with {thing}.",
            "Most things can be repaired if you are willing to take them apart slowly.",
            "The fault in {thing} turned out to be a single loose wire.",
            "{name} reached for {tool}, paused, and then reached for the instructions instead.",
            "People in {town} brought their broken things here rather than throw them away.",
            "A clean bench, good light and patience are worth more than expensive tools.",
            "Fixing {thing} took an afternoon, two cups of tea and a great deal of muttering.",
            "Every drawer was labelled, although the labels were no longer accurate.",
            "Repairs teach you how a thing was made, which is a lesson in itself.",
            "When the job was done, {name} felt {feeling} and swept the floor.",
            "The customer offered money, but {name} asked for a jar of honey instead.",
            "There is always one screw left over, and nobody knows where it came from.",
        ],
    },
    "market": {
        "things": ["fresh bread", "early strawberries", "wool socks", "honey in glass jars",
                   "secondhand books", "hand-thrown bowls", "bunches of tulips", "smoked cheese",
                   "winter squash", "bright scarves", "pears and apples", "bags of walnuts"],
        "tools": ["a folding table", "a striped awning", "a cash box", "a chalkboard sign",
                  "wicker baskets", "a set of brass weights"],
        "frames": [
            "On Saturdays the square in {town} filled with stalls selling {thing}.",
            "{name} set up {tool} before sunrise and arranged the {thing} in neat rows.",
            "Prices were written in chalk and changed whenever the weather did.",
            "Regular customers were greeted by name and sometimes given a little extra.",
            "By noon the {thing} had sold out, and {name} started packing away.",
            "The market was loud, cheerful and slightly chaotic, which is how people liked it.",
            "A street musician played the same three songs, and nobody minded.",
            "Even when {weather}, the traders came and the buyers followed.",
            "Bargaining was expected, but only a little, and always with a smile.",
            "{name} traded a basket of {thing} for a jar of honey from the next stall.",
            "Markets are older than shops, and in many towns they are still more popular.",
            "At the end of the day the square was swept clean as if nothing had happened.",
        ],
    },
    "school": {
        "things": ["fractions", "the water cycle", "the names of the planets", "long division",
                   "the history of the town", "how bridges carry weight", "the parts of a flower",
                   "reading maps", "simple machines", "the seasons"],
        "tools": ["a box of chalk", "coloured pencils", "a globe", "a set of rulers",
                  "a jar of seeds", "a small telescope", "paper and glue"],
        "frames": [
            "{name} taught at the village school in {town} for almost twenty years.",
            "That week the lesson was about {thing}, and the class was unusually quiet.",
            "With {tool} and a lot of patience, even difficult ideas can be made clear.",
            "One pupil asked a question that nobody, including the teacher, could answer.",
            "The best lessons, {name} believed, begin with something you can touch.",
            "Outside the classroom window, {weather}.",
            "The children drew pictures of {thing} and pinned them along the corridor.",
            "A mistake, explained carefully, teaches more than a correct answer copied.",
            "At the end of term there was a small fair with cakes, games and a prize for spelling.",
            "Years later, former pupils still remembered the lesson on {thing}.",
            "{name} marked homework in green ink because red seemed too unkind.",
            "Learning is slow at first and then, all at once, it is easy.",
        ],
    },
    "walk": {
        "things": ["the ridge path", "an old drovers' road", "the river towpath", "a forest track",
                   "the cliff walk", "a line of stepping stones", "the long way round the lake",
                   "a hill with a ruined tower"],
        "tools": ["a walking stick", "a packed lunch", "stout boots", "a rain jacket",
                  "a pair of binoculars", "a thermos of soup", "a hand-drawn map"],
        "frames": [
            "{name} set out along {thing} {time}, carrying {tool}.",
            "The path climbed steadily, and soon {town} was only a cluster of roofs below.",
            "Sheep watched from the hillside with mild and complete indifference.",
            "Halfway up, {weather}, and the view changed from one minute to the next.",
            "A heron stood in the shallows, perfectly still, waiting for its moment.",
            "{name} stopped at a stile to eat and to listen to the wind.",
            "Walking alone is a good way to think, and a better way to stop thinking.",
            "The map showed a bridge that had not existed for many years.",
            "Blackberries grew along {thing}, and very few of them reached home.",
            "By the time the light began to fade, {name} was {feeling} and ready for supper.",
            "Every footpath is a record of all the people who walked it before.",
            "The last mile is always the longest, whatever the map says.",
        ],
    },
    "science": {
        "things": ["the boiling point of water", "the speed of sound", "the way magnets attract",
                   "why the sky looks blue", "how seeds know which way is up", "the phases of "
                   "the moon", "why ice floats", "how a lever works", "the pull of gravity",
                   "how plants use light"],
        "tools": ["a thermometer", "a stopwatch", "a glass of water", "two magnets", "a candle",
                  "a prism", "a spring balance", "a notebook full of measurements"],
        "frames": [
            "{name} wanted to understand {thing}, so the kitchen became a laboratory.",
            "An experiment begins with a question and a guess that might be wrong.",
            "Using {tool}, {name} recorded the same measurement ten times.",
            "The numbers did not agree at first, which meant something had been missed.",
            "Good science is mostly careful counting and honest notes.",
            "Explaining {thing} to a child is harder than explaining it to a professor.",
            "A result that nobody can repeat is not yet a result.",
            "{name} drew a graph, and the points fell almost along a straight line.",
            "The simplest explanation is worth trying first, though it is not always right.",
            "Curiosity about {thing} has kept people busy for hundreds of years.",
            "When the experiment finally worked, {name} felt {feeling}.",
            "Every answer opened two new questions, and the notebook kept growing.",
        ],
    },
    "village": {
        "things": ["the annual fair", "the new bridge", "a meeting about the bus timetable",
                   "the harvest supper", "the repair of the church roof", "a lost dog",
                   "the opening of a bakery", "a flood in the lower streets", "the village choir",
                   "a football match against the next town"],
        "tools": ["a petition", "a notice on the post office door", "a collection tin",
                  "a long list of volunteers", "a borrowed microphone", "a pot of tea"],
        "frames": [
            "Everyone in {town} was talking about {thing}.",
            "{name} pinned up {tool} and waited to see who would respond.",
            "Small places have long memories, and most arguments are older than anyone involved.",
            "The hall was full, and the chairs ran out before the meeting began.",
            "In the end {thing} went better than anyone had dared to hope.",
            "Gossip travels faster than the post, though it is less reliable.",
            "{name} had lived in {town} all their life and still learned something new each week.",
            "Outside the hall, {weather}, and people lingered to talk anyway.",
            "It took a dozen volunteers and most of the {season} to organise {thing}.",
            "The mayor gave a speech that was shorter than usual, which earned warm applause.",
            "Afterwards there was cake, and the leftover slices were shared out carefully.",
            "A village works because people notice when something needs doing.",
        ],
    },
    "letters": {
        "things": ["a letter from an old friend", "a postcard with a faded stamp",
                   "a parcel wrapped in brown paper", "a note slipped under the door",
                   "an invitation to a wedding", "a long letter written on both sides",
                   "a birthday card", "an envelope with no return address"],
        "tools": ["a fountain pen", "a sheet of blue paper", "a book of stamps", "an envelope",
                  "a bottle of ink", "a writing desk by the window"],
        "frames": [
            "{name} received {thing} {time} and read it standing in the hall.",
            "Writing by hand is slow, which is exactly why it says so much.",
            "The handwriting was familiar, though it had become smaller over the years.",
            "{name} sat down with {tool} and tried three times to begin the reply.",
            "A letter takes days to arrive, and those days are part of the message.",
            "The news was mostly ordinary: the weather, the garden and a visit to {town}.",
            "At the bottom of the page there was a drawing of a cat in a hat.",
            "{name} kept every letter in a biscuit tin under the bed.",
            "Some letters are answered at once; others wait for the right {season}.",
            "When the reply was finally posted, {name} felt {feeling}.",
            "Postmen in {town} knew more about the town than anyone else.",
            "It is strange how a folded piece of paper can carry a voice so far.",
        ],
    },
}

OPENINGS = ["", "", "", "In {season}, ", "That year, ", "Some time ago, ", "Not long after, ",
            "As it happened, ", "One {season}, "]
LINKS = ["", "", "", "", "Later, ", "After that, ", "Meanwhile, ", "Even so, ", "Of course, ",
         "In the end, ", "For a while, ", "Still, ", "Sometimes, "]
ENDINGS = [
    "It was, all things considered, a good day.",
    "Nobody remembered the details afterwards, only the feeling of it.",
    "The story was told so often that it changed a little every time.",
    "Then the week went on, as weeks do.",
    "There was nothing remarkable about it, and that was the point.",
    "Years later, {name} still talked about it.",
    "And that, more or less, is how it went.",
    "The next morning everything looked exactly the same, and yet it was not.",
]


def _fill(frame: str, rng: random.Random, topic: dict, name: str, town: str) -> str:
  return frame.format(name=name, town=town, season=rng.choice(SEASONS), time=rng.choice(TIMES),
                      weather=rng.choice(WEATHER), feeling=rng.choice(FEELINGS),
                      thing=rng.choice(topic["things"]), tool=rng.choice(topic["tools"]))


def _lower_first(sentence: str) -> str:
  """Lower-cases the first word after a linking phrase, unless it is a name or a town."""
  first = sentence.split(" ", 1)[0].strip(",.")
  if first in NAMES or any(t.startswith(first) for t in TOWNS) or first in ("A", "I"):
    return sentence if first != "A" else "a" + sentence[1:]
  return sentence[0].lower() + sentence[1:]


def document(rng: random.Random) -> str:
  """One paragraph of 4 to 9 sentences on one topic, with one main character and town."""
  topic = TOPICS[rng.choice(sorted(TOPICS))]
  name, town = rng.choice(NAMES), rng.choice(TOWNS)
  frames = rng.sample(topic["frames"], k=rng.randint(4, min(9, len(topic["frames"]))))
  sentences = []
  for i, frame in enumerate(frames):
    sentence = _fill(frame, rng, topic, name, town)
    sentence = sentence[0].upper() + sentence[1:]
    prefix = rng.choice(OPENINGS if i == 0 else LINKS)
    if prefix:
      sentence = prefix.format(season=rng.choice(SEASONS)) + _lower_first(sentence)
    sentences.append(sentence)
  if rng.random() < 0.4:
    sentences.append(rng.choice(ENDINGS).format(name=name))
  return " ".join(sentences)


def write_corpus(out_dir: str, documents: int = 400, files: int = 3, seed: int = 0) -> list[str]:
  """Writes `files` text files of distinct documents, one per line; returns their paths."""
  rng = random.Random(seed)
  docs = list(dict.fromkeys(document(rng) for _ in range(documents)))
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for i in range(files):
    path = os.path.join(out_dir, f"part_{'abcdefgh'[i]}.txt")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.write("\n".join(docs[i::files]) + "\n")
    os.replace(path + ".tmp", path)
    paths.append(path)
  return paths


if __name__ == "__main__":
  for written in write_corpus(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                           "en_corpus")):
    print(written, os.path.getsize(written), "bytes")
