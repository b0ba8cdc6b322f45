"""Write `assets/bundled_instructions.jsonl`: the project's own offline instruction-tuning set (Alpaca schema).

Every row is original text written for this project (no rows are copied from Alpaca or any other data set). About
half the rows are hand-written; the rest come from templates whose answers are computed here in Python (arithmetic,
unit conversions, sorting, primes, ...), so they are correct by construction. The output is deterministic: a fixed
seed picks the template numbers and shuffles the rows so any slice mixes task types.

Usage: `python scripts/make_bundled_dataset.py` (rewrites the file) or `--check` (exit 1 if the file is stale).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from fractions import Fraction
from pathlib import Path

OUT_PATH = Path(__file__).resolve().parents[1] / "assets" / "bundled_instructions.jsonl"
SEED = 20260511

# (instruction, input, output) written by hand. Outputs are 1-4 sentences (or a few lines of code).
HAND_WRITTEN: list[tuple[str, str, str]] = [
    # --- science -----------------------------------------------------------------------------------------------
    (
        "Why is the sky blue?",
        "",
        "Sunlight is scattered by the gas molecules in the air, and short blue wavelengths scatter far more than "
        "long red ones. That scattered blue light reaches our eyes from every part of the sky, so the sky looks blue.",
    ),
    (
        "What is photosynthesis?",
        "",
        "Photosynthesis is the process plants, algae and some bacteria use to turn light energy, carbon dioxide and "
        "water into sugar. Oxygen is released as a by-product.",
    ),
    (
        "At what temperature does water boil at sea level?",
        "",
        "At normal sea-level pressure, pure water boils at 100 degrees Celsius, which is 212 degrees Fahrenheit.",
    ),
    (
        "Explain what an atom is in two sentences.",
        "",
        "An atom is the smallest unit of a chemical element that keeps the properties of that element. It has a "
        "small, dense nucleus of protons and neutrons surrounded by electrons.",
    ),
    (
        "What causes the seasons on Earth?",
        "",
        "The seasons come from the tilt of Earth's axis, about 23.4 degrees. As Earth orbits the Sun, each "
        "hemisphere spends part of the year tilted toward the Sun, getting more direct light (summer), and part "
        "tilted away (winter).",
    ),
    (
        "What is the difference between weather and climate?",
        "",
        "Weather is the state of the atmosphere at one place and time, such as today's rain or wind. Climate is the "
        "typical pattern of weather in a region averaged over many years, usually thirty or more.",
    ),
    (
        "What is gravity?",
        "",
        "Gravity is the attraction between all objects that have mass. It keeps us on the ground, holds the Moon in "
        "orbit around Earth and keeps Earth in orbit around the Sun.",
    ),
    (
        "Name the three states of matter we meet in everyday life.",
        "",
        "The three everyday states of matter are solid, liquid and gas.",
    ),
    (
        "What is DNA?",
        "",
        "DNA (deoxyribonucleic acid) is the molecule that stores the genetic instructions of living things. It is "
        "made of two strands wound around each other in a double helix.",
    ),
    (
        "How does a vaccine protect people?",
        "",
        "A vaccine shows the immune system a harmless piece or weakened form of a germ. The body learns to recognise "
        "it and keeps memory cells, so it can fight the real germ quickly if it ever appears.",
    ),
    (
        "How fast does light travel in a vacuum?",
        "",
        "Light travels at exactly 299,792,458 meters per second in a vacuum, or roughly 300,000 kilometers per "
        "second.",
    ),
    (
        "Why do some objects float in water?",
        "",
        "An object floats when it can push aside a weight of water equal to its own weight before it is fully under "
        "water. The upward push of the water is called buoyancy, as described by Archimedes' principle.",
    ),
    (
        "What is the chemical formula of water?",
        "",
        "The chemical formula of water is H2O: each molecule has two hydrogen atoms bonded to one oxygen atom.",
    ),
    (
        "What is an ecosystem?",
        "",
        "An ecosystem is a community of living things together with their surroundings, such as soil, water and "
        "climate. Its members are linked by food webs and by the flow of energy and nutrients.",
    ),
    (
        "Explain the difference between a virus and a bacterium.",
        "",
        "Bacteria are single-celled organisms that can grow and divide on their own. Viruses are much smaller and "
        "can only multiply inside the cells of a host. Antibiotics work against many bacteria but not against "
        "viruses.",
    ),
    (
        "Which is the largest planet in the solar system?",
        "",
        "Jupiter is the largest planet in the solar system. It is a gas giant with more than 300 times the mass of "
        "Earth.",
    ),
    (
        "Why does the Moon appear to change shape during the month?",
        "",
        "The Moon shines by reflecting sunlight, and as it orbits Earth we see different amounts of its lit half. "
        "This changing view gives the phases, from new moon to full moon and back again.",
    ),
    (
        "What is kinetic energy?",
        "",
        "Kinetic energy is the energy an object has because it is moving. It equals one half of the mass times the "
        "square of the speed.",
    ),
    (
        "What is the pH of pure water?",
        "",
        "Pure water at 25 degrees Celsius has a pH of 7, which is neutral: neither acidic nor basic.",
    ),
    (
        "What is evaporation?",
        "",
        "Evaporation is the change of a liquid into a gas at its surface, even below the boiling point. A puddle "
        "drying in the sun is an everyday example.",
    ),
    (
        "How many bones does an adult human have?",
        "",
        "An adult human skeleton usually has 206 bones. Babies are born with more, but some of them fuse as they "
        "grow.",
    ),
    (
        "What does the heart do?",
        "",
        "The heart is a muscle that pumps blood around the body. The blood carries oxygen and nutrients to the "
        "tissues and takes carbon dioxide and waste away.",
    ),
    (
        "Which gas do people need to breathe in to stay alive?",
        "",
        "People need oxygen. The lungs pass it into the blood, and the cells use it to release energy from food.",
    ),
    (
        "What is a food chain?",
        "",
        "A food chain shows who eats whom in a habitat, starting from a producer such as a plant. For example, grass "
        "is eaten by a rabbit, and the rabbit is eaten by a fox.",
    ),
    (
        "What is the difference between a conductor and an insulator?",
        "",
        "A conductor, such as copper, lets electric current or heat flow through it easily. An insulator, such as "
        "rubber or plastic, resists that flow, which is why cables are coated with it.",
    ),
    (
        "Why do we see lightning before we hear thunder?",
        "",
        "Light travels almost a million times faster than sound through air. The flash reaches us almost instantly, "
        "while the sound of the thunder takes about three seconds to travel each kilometer.",
    ),
    (
        "What is the main job of the roots of a plant?",
        "",
        "Roots hold the plant in the soil and take up water and dissolved minerals. Some roots, like those of "
        "carrots, also store food.",
    ),
    (
        "Explain what friction is.",
        "",
        "Friction is the force that resists two surfaces sliding over each other. It lets our shoes grip the floor, "
        "but it also wastes energy as heat in machines.",
    ),
    # --- programming -------------------------------------------------------------------------------------------
    (
        "What is a variable in programming?",
        "",
        "A variable is a named place that stores a value in a program. The program can read the value and change it "
        "while it runs.",
    ),
    (
        "What is the difference between a list and a tuple in Python?",
        "",
        "A list is mutable: you can add, remove or change its items after creating it. A tuple is immutable, so its "
        "items cannot change once it is created. Lists are written with square brackets and tuples with parentheses.",
    ),
    (
        "Explain what a function is in programming.",
        "",
        "A function is a named block of code that does one job. It can take inputs called parameters and return a "
        "result, so the same logic can be reused in many places.",
    ),
    (
        "What does HTML stand for?",
        "",
        "HTML stands for HyperText Markup Language. It describes the structure and content of web pages.",
    ),
    (
        "What is recursion?",
        "",
        "Recursion is when a function solves a problem by calling itself on a smaller version of the same problem. "
        "Every recursive function needs a base case that stops the chain of calls.",
    ),
    (
        "What is Git used for?",
        "",
        "Git is a version control system. It records the history of changes to files, lets several people work on "
        "the same project and makes it easy to return to an earlier version.",
    ),
    (
        "What is an API?",
        "",
        "An API (application programming interface) is a defined way for one program to ask another for data or "
        "services. It lists the available operations and the format of their inputs and outputs.",
    ),
    (
        "What is the time complexity of binary search?",
        "",
        "Binary search takes O(log n) time, because every comparison halves the part of the sorted list that still "
        "has to be searched.",
    ),
    (
        "What is a bug in software?",
        "",
        "A bug is a mistake in a program that makes it behave differently from what was intended, for example by "
        "crashing or giving a wrong result.",
    ),
    (
        "What is the difference between == and is in Python?",
        "",
        "`==` checks whether two objects have equal values, while `is` checks whether two names refer to the very "
        "same object in memory.",
    ),
    (
        "What does SQL stand for and what is it used for?",
        "",
        "SQL stands for Structured Query Language. It is used to create, query and update data in relational "
        "databases.",
    ),
    (
        "What is a compiler?",
        "",
        "A compiler is a program that translates source code written in a high-level language into machine code or "
        "another lower-level form that a computer can run.",
    ),
    (
        "What is an infinite loop?",
        "",
        "An infinite loop is a loop whose exit condition is never met, so it keeps running until the program is "
        "stopped from outside.",
    ),
    (
        "What is JSON?",
        "",
        "JSON (JavaScript Object Notation) is a lightweight text format for structured data built from key-value "
        "objects and arrays. Almost every programming language can read and write it.",
    ),
    (
        "What is a unit test?",
        "",
        "A unit test is a small automated test that checks one piece of code, such as a single function, on its own. "
        "Unit tests catch mistakes early and make later changes safer.",
    ),
    (
        "What is the difference between RAM and disk storage?",
        "",
        "RAM is fast, temporary memory that holds the data a computer is working on right now, and it is cleared "
        "when the power goes off. Disk storage is slower but keeps files permanently.",
    ),
    (
        "What is an index in a database?",
        "",
        "An index is an extra data structure that lets a database find rows quickly by the value of a column, much "
        "like the index at the back of a book. It speeds up reads but costs some space and slows down writes a "
        "little.",
    ),
    (
        "Write a Python function that returns the square of a number.",
        "",
        "def square(x):\n    return x * x",
    ),
    (
        "Write a Python function that checks whether an integer is even.",
        "",
        "def is_even(n):\n    return n % 2 == 0",
    ),
    (
        "How do you reverse a string s in Python?",
        "",
        "Use slicing with a step of -1: `s[::-1]` returns the characters of s in reverse order.",
    ),
    (
        "Write a Python function that returns the largest item of a non-empty list without using max().",
        "",
        "def largest(items):\n    best = items[0]\n    for item in items[1:]:\n        if item > best:\n            "
        "best = item\n    return best",
    ),
    (
        "Write a SQL query that selects every row from a table named users.",
        "",
        "SELECT * FROM users;",
    ),
    (
        "Write a JavaScript function that adds two numbers.",
        "",
        "function add(a, b) {\n  return a + b;\n}",
    ),
    (
        "Write a Python loop that prints the numbers from 1 to 5.",
        "",
        "for i in range(1, 6):\n    print(i)",
    ),
    (
        "Fix the bug in this Python function.",
        "def add(a, b):\n    return a - b",
        "The function subtracts instead of adding. The corrected version is:\ndef add(a, b):\n    return a + b",
    ),
    (
        "Explain what this Python code does.",
        "print(len([4, 8, 15]))",
        "It builds a list with three numbers and prints the length of that list, so it prints 3.",
    ),
    (
        "What does this Python code print?",
        "x = 4\ny = x * 3\nprint(y - 2)",
        "It prints 10: y is 4 times 3, which is 12, and 12 minus 2 is 10.",
    ),
    (
        "Write a Python function that counts the vowels in a string.",
        "",
        'def count_vowels(text):\n    return sum(1 for ch in text.lower() if ch in "aeiou")',
    ),
    (
        "Write a Python list comprehension that gives the squares of the numbers 0 to 9.",
        "",
        "[n * n for n in range(10)]",
    ),
    (
        "Which shell command lists all files in the current directory, including hidden ones?",
        "",
        "Run `ls -a`. The `-a` flag also shows files whose names start with a dot.",
    ),
    (
        "Rewrite this Python loop as a list comprehension.",
        "result = []\nfor w in words:\n    result.append(w.upper())",
        "result = [w.upper() for w in words]",
    ),
    (
        "Find the error in this Python code.",
        "for i in range(3)\n    print(i)",
        "The `for` line is missing a colon at the end. It should read `for i in range(3):`.",
    ),
    (
        "Write a Python function that returns the factorial of a non-negative integer.",
        "",
        "def factorial(n):\n    result = 1\n    for k in range(2, n + 1):\n        result *= k\n    return result",
    ),
    (
        "Write a Python dictionary that maps the numbers 1, 2 and 3 to their English names.",
        "",
        'names = {1: "one", 2: "two", 3: "three"}',
    ),
    (
        "What is the output of this Python code?",
        'print("ab" * 3)',
        "It prints ababab, because multiplying a string by 3 repeats it three times.",
    ),
    (
        "Write a SQL query that counts the rows in a table named orders.",
        "",
        "SELECT COUNT(*) FROM orders;",
    ),
    # --- geography ----------------------------------------------------------------------------------------------
    (
        "What is the longest river in Africa?",
        "",
        "The Nile is the longest river in Africa. It flows north for about 6,650 kilometers and empties into the "
        "Mediterranean Sea.",
    ),
    (
        "What is the highest mountain above sea level?",
        "",
        "Mount Everest, on the border between Nepal and China, is the highest mountain above sea level at about "
        "8,849 meters.",
    ),
    (
        "How many continents are there?",
        "",
        "By the most common convention there are seven continents: Africa, Antarctica, Asia, Australia, Europe, "
        "North America and South America.",
    ),
    (
        "Which is the largest ocean on Earth?",
        "",
        "The Pacific Ocean is the largest and deepest ocean. It covers about a third of Earth's surface.",
    ),
    (
        "What is the largest hot desert in the world?",
        "",
        "The Sahara in northern Africa is the largest hot desert. Antarctica is larger, but it is a cold desert.",
    ),
    (
        "What is the equator?",
        "",
        "The equator is the imaginary line around Earth halfway between the North and South Poles, at 0 degrees "
        "latitude. It divides the planet into the Northern and Southern Hemispheres.",
    ),
    (
        "What is a peninsula?",
        "",
        "A peninsula is a piece of land surrounded by water on three sides and joined to a larger land mass on the "
        "fourth. Italy and Florida are well-known examples.",
    ),
    (
        "Which country has the largest area?",
        "",
        "Russia is the largest country by area, covering about 17 million square kilometers across Europe and Asia.",
    ),
    (
        "Name the Great Lakes of North America.",
        "",
        "The five Great Lakes are Superior, Michigan, Huron, Erie and Ontario.",
    ),
    (
        "What is the smallest country in the world?",
        "",
        "Vatican City is the smallest country in the world. It covers less than half a square kilometer inside the "
        "city of Rome.",
    ),
    (
        "Which strait separates Spain from Morocco?",
        "",
        "The Strait of Gibraltar separates Spain in Europe from Morocco in Africa and links the Atlantic Ocean with "
        "the Mediterranean Sea.",
    ),
    (
        "What is a river delta?",
        "",
        "A delta is a landform at the mouth of a river, built from sediment the river drops as it slows down and "
        "spreads into a sea or lake. The Nile and the Mississippi both end in large deltas.",
    ),
    (
        "On which continent is the Amazon rainforest?",
        "",
        "The Amazon rainforest is in South America. Most of it lies in Brazil, and it also reaches into Peru, "
        "Colombia and several other countries.",
    ),
    (
        "What is a volcano?",
        "",
        "A volcano is an opening in Earth's crust through which molten rock, ash and gases escape from below. Over "
        "time the erupted material can build up into a mountain.",
    ),
    (
        "What are lines of longitude?",
        "",
        "Lines of longitude, or meridians, run from the North Pole to the South Pole. They measure how far east or "
        "west a place is from the prime meridian at Greenwich, in degrees.",
    ),
    (
        "What is an archipelago?",
        "",
        "An archipelago is a group or chain of islands. Japan, Indonesia and the Philippines are large examples.",
    ),
    # --- rewriting ---------------------------------------------------------------------------------------------
    (
        "Rewrite this sentence in a more formal tone.",
        "Hey, can you send me the report asap?",
        "Could you please send me the report at your earliest convenience?",
    ),
    (
        "Rewrite the sentence in the passive voice.",
        "The chef cooked a delicious meal.",
        "A delicious meal was cooked by the chef.",
    ),
    (
        "Rewrite the sentence in the passive voice.",
        "The committee approved the new budget.",
        "The new budget was approved by the committee.",
    ),
    (
        "Rewrite the sentence in the passive voice.",
        "Maria painted the fence on Saturday.",
        "The fence was painted by Maria on Saturday.",
    ),
    (
        "Change this sentence to the active voice.",
        "The window was broken by the ball.",
        "The ball broke the window.",
    ),
    (
        "Change this sentence to the active voice.",
        "The letter was delivered by the postman this morning.",
        "The postman delivered the letter this morning.",
    ),
    (
        "Fix the grammar in this sentence.",
        "She don't like going to the dentist.",
        "She doesn't like going to the dentist.",
    ),
    (
        "Fix the grammar in this sentence.",
        "Me and him goes to the park every day.",
        "He and I go to the park every day.",
    ),
    (
        "Correct the spelling mistakes.",
        "I recieved the pakage yesturday.",
        "I received the package yesterday.",
    ),
    (
        "Correct the spelling mistakes.",
        "The resturant was definately worth the wait.",
        "The restaurant was definitely worth the wait.",
    ),
    (
        "Make this sentence shorter without changing its meaning.",
        "At this point in time, we are not in a position to make a decision.",
        "We cannot decide yet.",
    ),
    (
        "Rewrite this sentence in simple words that a young child would understand.",
        "Precipitation is expected throughout the afternoon.",
        "It will probably rain this afternoon.",
    ),
    (
        "Rewrite this sentence in the past tense.",
        "The children play in the garden after school.",
        "The children played in the garden after school.",
    ),
    (
        "Rewrite this sentence in the future tense.",
        "We visit our grandparents in July.",
        "We will visit our grandparents in July.",
    ),
    (
        "Turn this statement into a yes-or-no question.",
        "The train leaves at noon.",
        "Does the train leave at noon?",
    ),
    (
        "Combine these two sentences into one.",
        "The museum opens at nine. It closes at five.",
        "The museum opens at nine and closes at five.",
    ),
    (
        "Rewrite this message so it sounds polite.",
        "Give me the keys now.",
        "Could you please give me the keys?",
    ),
    (
        "Rewrite this sentence without the double negative.",
        "I don't know nothing about it.",
        "I don't know anything about it.",
    ),
    (
        "Paraphrase this sentence.",
        "The meeting was postponed because of the storm.",
        "Because of the storm, the meeting was moved to a later date.",
    ),
    (
        "Rewrite this headline as a full sentence.",
        "Local Bakery Wins National Bread Award",
        "A local bakery has won a national award for its bread.",
    ),
    # --- classification ------------------------------------------------------------------------------------------
    (
        "Classify the sentiment of this review as positive, negative or neutral.",
        "The battery lasts all day and the screen is gorgeous.",
        "Positive. The review praises both the battery life and the screen.",
    ),
    (
        "Classify the sentiment of this review as positive, negative or neutral.",
        "The package arrived two weeks late and the lid was cracked.",
        "Negative. The reviewer complains about a late delivery and a damaged product.",
    ),
    (
        "Classify the sentiment of this review as positive, negative or neutral.",
        "The hotel is ten minutes from the station.",
        "Neutral. The sentence states a fact about the location without praising or criticising it.",
    ),
    (
        "Classify the sentiment of this review as positive, negative or neutral.",
        "I would happily eat here every week; the soup alone is worth the trip.",
        "Positive. The reviewer wants to come back often and praises the food.",
    ),
    (
        "Classify the sentiment of this review as positive, negative or neutral.",
        "The instructions were confusing and two screws were missing.",
        "Negative. The reviewer reports unclear instructions and missing parts.",
    ),
    (
        "Is this statement a fact or an opinion?",
        "Water freezes at 0 degrees Celsius at sea-level pressure.",
        "It is a fact: it can be checked by measurement and is true.",
    ),
    (
        "Is this statement a fact or an opinion?",
        "Summer is the best season of the year.",
        "It is an opinion, because it expresses a personal preference that people can disagree with.",
    ),
    (
        "Is this statement a fact or an opinion?",
        "Mount Everest is taller than Mont Blanc.",
        "It is a fact: Everest is about 8,849 meters high and Mont Blanc about 4,800 meters.",
    ),
    (
        "Is this email spam or not spam?",
        "Congratulations! You have won a free cruise. Click this link within one hour to claim your prize.",
        "Spam. It promises an unexpected prize and pressures the reader to click a link quickly.",
    ),
    (
        "Is this email spam or not spam?",
        "Hi Sam, the team meeting moved to Thursday at 10. The agenda is unchanged.",
        "Not spam. It is an ordinary work message about a rescheduled meeting.",
    ),
    (
        "Sort these items into fruits and vegetables.",
        "carrot, apple, spinach, banana, potato, cherry",
        "Fruits: apple, banana, cherry. Vegetables: carrot, spinach, potato.",
    ),
    (
        "What part of speech is the word 'quickly' in this sentence?",
        "She quickly finished her homework.",
        "'Quickly' is an adverb: it describes how she finished her homework.",
    ),
    (
        "What part of speech is the word 'bright' in this sentence?",
        "We painted the door a bright yellow.",
        "'Bright' is an adjective: it describes the colour yellow.",
    ),
    (
        "Identify the verb in this sentence.",
        "The old dog slept under the table.",
        "The verb is 'slept'.",
    ),
    (
        "Classify this sentence as a question, a command or a statement.",
        "Please close the door behind you.",
        "It is a command, because it tells someone to do something.",
    ),
    (
        "Classify this sentence as a question, a command or a statement.",
        "The library closes at eight tonight.",
        "It is a statement, because it gives information.",
    ),
    (
        "Which of these is not a primary colour in painting?",
        "red, green, blue, yellow",
        "Green. The traditional primary colours in painting are red, yellow and blue; green is made by mixing blue "
        "and yellow.",
    ),
    (
        "Which word does not belong with the others?",
        "violin, cello, trumpet, viola",
        "Trumpet, because it is a brass instrument while the others are string instruments.",
    ),
    # --- summarising a given passage (passages kept short so prompts fit a 128-token budget) -------------------
    (
        "Summarise this passage in one sentence.",
        "A honeybee colony has one queen and thousands of workers. The workers gather nectar and pollen, build comb "
        "and guard the hive, while the queen lays the eggs.",
        "In a honeybee colony, thousands of workers gather food and run the hive while a single queen lays the eggs.",
    ),
    (
        "Summarise this passage in one sentence.",
        "The town council voted on Tuesday to turn the empty car park on Mill Street into a public garden. Work "
        "starts in spring and is paid for by a regional grant.",
        "The council approved a grant-funded plan to turn the Mill Street car park into a public garden, starting in "
        "spring.",
    ),
    (
        "Give a short summary of the following text.",
        "Regular stretching keeps muscles flexible and joints moving freely. Without it, muscles can shorten and "
        "tighten, which makes injuries more likely.",
        "Regular stretching keeps muscles flexible and joints mobile, which lowers the risk of injury.",
    ),
    (
        "Summarise this paragraph in one sentence.",
        "The first mechanical clocks, built into European towers around 1300, had no minute hand and simply struck a "
        "bell each hour. Springs and pendulums later made clocks smaller and far more accurate.",
        "Clocks began as tower machines that only struck the hours and later, thanks to springs and pendulums, "
        "became smaller and much more accurate.",
    ),
    (
        "Summarise the main point of this text.",
        "Slightly stale bread still has many uses: it can become croutons, breadcrumbs or bread pudding. Using it up "
        "saves money and cuts food waste.",
        "Stale bread need not be thrown away, since turning it into croutons, breadcrumbs or pudding saves money and "
        "reduces waste.",
    ),
    (
        "Summarise this passage in one sentence.",
        "The library will close for two weeks in August while new shelves are fitted. Books can still be returned "
        "through the slot by the front door.",
        "The library closes for two weeks in August for new shelves, but books can still be returned through the "
        "door slot.",
    ),
    (
        "Write a one-sentence summary of this text.",
        "Octopuses have three hearts: two pump blood through the gills and the third pumps it around the body. Their "
        "blood carries oxygen with a copper-based protein, which makes it blue.",
        "Octopuses have three hearts and blue blood, which gets its colour from a copper-based protein that carries "
        "oxygen.",
    ),
    (
        "Summarise this passage in one sentence.",
        "Since the riverside cycle lane opened last month, cycling to work on that route has almost doubled. Local "
        "shops report more customers arriving by bike.",
        "Since the riverside cycle lane opened, cycling to work on that route has nearly doubled and local shops see "
        "more customers on bikes.",
    ),
    # --- translating simple phrases ---------------------------------------------------------------------------
    (
        "Translate this phrase into Spanish.",
        "Good morning.",
        "Buenos días.",
    ),
    (
        "Translate this phrase into French.",
        "Thank you very much.",
        "Merci beaucoup.",
    ),
    (
        "Translate this phrase into German.",
        "Where is the train station?",
        "Wo ist der Bahnhof?",
    ),
    (
        "Translate this phrase into Spanish.",
        "Where is the train station?",
        "¿Dónde está la estación de tren?",
    ),
    (
        "Translate this phrase into French.",
        "I would like a cup of coffee.",
        "Je voudrais une tasse de café.",
    ),
    (
        "Translate this phrase into German.",
        "The cat is black.",
        "Die Katze ist schwarz.",
    ),
    (
        "Translate this phrase into Spanish.",
        "The cat is black.",
        "El gato es negro.",
    ),
    (
        "Translate this phrase into French.",
        "See you tomorrow.",
        "À demain.",
    ),
    (
        "Translate this phrase into German.",
        "Good night.",
        "Gute Nacht.",
    ),
    (
        "Translate this phrase into Spanish.",
        "I am hungry.",
        "Tengo hambre.",
    ),
    (
        "Translate this phrase into French.",
        "I am hungry.",
        "J'ai faim.",
    ),
    (
        "Translate this phrase into German.",
        "Thank you very much.",
        "Vielen Dank.",
    ),
    (
        "Translate this sentence from Spanish into English.",
        "Muchas gracias por tu ayuda.",
        "Thank you very much for your help.",
    ),
    (
        "Translate this sentence from French into English.",
        "Où est la bibliothèque ?",
        "Where is the library?",
    ),
    (
        "Translate this sentence from German into English.",
        "Ich habe zwei Brüder.",
        "I have two brothers.",
    ),
    # --- lists ---------------------------------------------------------------------------------------------------
    (
        "List the three primary colours used in painting.",
        "",
        "The traditional primary colours in painting are red, yellow and blue.",
    ),
    (
        "Name the four planets that are closer to the Sun than Jupiter.",
        "",
        "Mercury, Venus, Earth and Mars.",
    ),
    (
        "List the days of the week.",
        "",
        "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday.",
    ),
    (
        "Give three tips for staying focused while studying.",
        "",
        "1. Put your phone in another room. 2. Work in short blocks with brief breaks in between. 3. Set one clear "
        "goal for each session.",
    ),
    (
        "List five programming languages.",
        "",
        "Python, JavaScript, C, Java and Rust.",
    ),
    (
        "Name three renewable sources of energy.",
        "",
        "Solar power, wind power and hydroelectric power.",
    ),
    (
        "List the noble gases that occur in nature.",
        "",
        "Helium, neon, argon, krypton, xenon and radon.",
    ),
    (
        "List four ways to save water at home.",
        "",
        "1. Turn off the tap while brushing your teeth. 2. Take shorter showers. 3. Fix dripping taps. 4. Run the "
        "washing machine only with full loads.",
    ),
    (
        "Suggest three names for a small neighbourhood bakery.",
        "",
        "The Rolling Pin, Morning Crust and Corner Loaf.",
    ),
    (
        "List the first five prime numbers.",
        "",
        "2, 3, 5, 7 and 11.",
    ),
    (
        "Give three examples of mammals that live in the ocean.",
        "",
        "Whales, dolphins and seals.",
    ),
    (
        "List the steps to make a cup of tea with a tea bag.",
        "",
        "1. Boil water. 2. Put the tea bag in a cup and pour the hot water over it. 3. Let it steep for three to "
        "five minutes. 4. Remove the bag and add milk or sugar if you like.",
    ),
    (
        "Name the instruments of a string quartet.",
        "",
        "A string quartet has two violins, a viola and a cello.",
    ),
    (
        "List the months that have 31 days.",
        "",
        "January, March, May, July, August, October and December.",
    ),
    (
        "List three things to pack for a day of hiking.",
        "",
        "Plenty of water, a rain jacket and a map of the route.",
    ),
    (
        "Name three parts of a flower.",
        "",
        "Petals, the stamen and the pistil.",
    ),
    (
        "List the colours of the rainbow in order.",
        "",
        "Red, orange, yellow, green, blue, indigo and violet.",
    ),
    # --- language and general knowledge --------------------------------------------------------------------------
    (
        "What is a haiku?",
        "",
        "A haiku is a short poem from Japan with three lines, traditionally of five, seven and five syllables.",
    ),
    (
        "Write a haiku about autumn.",
        "",
        "Crisp leaves drift and fall\nthe maple lets go of red\ncold wind hums softly",
    ),
    (
        "Explain what inflation means.",
        "",
        "Inflation is the general rise in prices over time. When it happens, the same amount of money buys less than "
        "it did before.",
    ),
    (
        "What is the difference between 'their', 'there' and 'they're'?",
        "",
        "'Their' shows possession (their house), 'there' refers to a place (over there), and 'they're' is short for "
        "'they are'.",
    ),
    (
        "What is a synonym?",
        "",
        "A synonym is a word with the same or nearly the same meaning as another word, such as 'big' and 'large'.",
    ),
    (
        "Write a short thank-you note to a neighbour who watered your plants.",
        "",
        "Dear neighbour, thank you so much for watering my plants while I was away. They look happier than ever, and "
        "I really appreciate your help.",
    ),
    (
        "Give a one-sentence definition of democracy.",
        "",
        "Democracy is a system of government in which citizens choose their leaders and shape laws, usually through "
        "free and regular elections.",
    ),
    (
        "What is the difference between a simile and a metaphor?",
        "",
        "A simile compares two things using 'like' or 'as' (her smile was like sunshine). A metaphor says one thing "
        "is another (her smile was sunshine).",
    ),
    (
        "Explain why regular sleep is important.",
        "",
        "During sleep the body repairs itself and the brain stores memories. Getting enough regular sleep improves "
        "concentration, mood and the immune system.",
    ),
    (
        "Write a sentence that uses the word 'reluctant'.",
        "",
        "The cat was reluctant to leave the warm spot by the fire.",
    ),
    (
        "What is an acronym? Give an example.",
        "",
        "An acronym is a word formed from the first letters of other words and spoken as a word. For example, NASA "
        "stands for National Aeronautics and Space Administration.",
    ),
    (
        "Suggest a title for a story about a lighthouse keeper who finds a message in a bottle.",
        "",
        "The Keeper and the Bottle.",
    ),
    (
        "Extract the names of the cities mentioned in this sentence.",
        "We flew from Lisbon to Oslo and then took the train to Stockholm.",
        "Lisbon, Oslo and Stockholm.",
    ),
    (
        "Extract the date from this sentence.",
        "The concert was moved to 14 March 2027 because of the weather.",
        "14 March 2027.",
    ),
    (
        "Answer the question using the text.",
        "Text: Priya planted tomatoes in May and picked the first ripe ones in August. Question: When did Priya "
        "plant the tomatoes?",
        "Priya planted the tomatoes in May.",
    ),
    (
        "Answer the question using the text.",
        "Text: The bridge is 240 meters long and was finished in 1998. Question: How long is the bridge?",
        "The bridge is 240 meters long.",
    ),
]

# Countries and capitals chosen where the capital is unambiguous.
CAPITALS: list[tuple[str, str, str]] = [
    ("France", "Paris", "Europe"),
    ("Germany", "Berlin", "Europe"),
    ("Italy", "Rome", "Europe"),
    ("Spain", "Madrid", "Europe"),
    ("Portugal", "Lisbon", "Europe"),
    ("Japan", "Tokyo", "Asia"),
    ("Canada", "Ottawa", "North America"),
    ("Australia", "Canberra", "Oceania"),
    ("Brazil", "Brasília", "South America"),
    ("Egypt", "Cairo", "Africa"),
    ("Kenya", "Nairobi", "Africa"),
    ("India", "New Delhi", "Asia"),
    ("China", "Beijing", "Asia"),
    ("Mexico", "Mexico City", "North America"),
    ("Argentina", "Buenos Aires", "South America"),
    ("Norway", "Oslo", "Europe"),
    ("Sweden", "Stockholm", "Europe"),
    ("Finland", "Helsinki", "Europe"),
    ("Poland", "Warsaw", "Europe"),
    ("Greece", "Athens", "Europe"),
    ("Turkey", "Ankara", "Asia and Europe"),
    ("Peru", "Lima", "South America"),
    ("Chile", "Santiago", "South America"),
    ("Thailand", "Bangkok", "Asia"),
    ("South Korea", "Seoul", "Asia"),
    ("Ireland", "Dublin", "Europe"),
    ("Austria", "Vienna", "Europe"),
    ("Hungary", "Budapest", "Europe"),
    ("Morocco", "Rabat", "Africa"),
    ("Nigeria", "Abuja", "Africa"),
    ("New Zealand", "Wellington", "Oceania"),
    ("Vietnam", "Hanoi", "Asia"),
    ("Colombia", "Bogotá", "South America"),
    ("Denmark", "Copenhagen", "Europe"),
    ("Cuba", "Havana", "North America"),
    ("Ethiopia", "Addis Ababa", "Africa"),
]

ANIMAL_CLASSES: list[tuple[str, str]] = [
    ("dolphin", "mammal"),
    ("eagle", "bird"),
    ("crocodile", "reptile"),
    ("salmon", "fish"),
    ("frog", "amphibian"),
    ("bat", "mammal"),
    ("penguin", "bird"),
    ("tortoise", "reptile"),
    ("shark", "fish"),
    ("salamander", "amphibian"),
    ("whale", "mammal"),
    ("owl", "bird"),
    ("lizard", "reptile"),
    ("tuna", "fish"),
    ("toad", "amphibian"),
]
CLASS_REASONS = {
    "mammal": "it is warm-blooded, breathes air and feeds its young on milk",
    "bird": "it has feathers and a beak and lays eggs",
    "reptile": "it has dry, scaly skin and is cold-blooded",
    "fish": "it lives in water and breathes through gills",
    "amphibian": "it starts life in water and later lives partly on land",
}

PLURALS: list[tuple[str, str]] = [
    ("mouse", "mice"),
    ("child", "children"),
    ("goose", "geese"),
    ("tooth", "teeth"),
    ("woman", "women"),
    ("person", "people"),
    ("leaf", "leaves"),
    ("sheep", "sheep"),
    ("knife", "knives"),
    ("foot", "feet"),
]
ANTONYMS: list[tuple[str, str]] = [
    ("ancient", "modern"),
    ("generous", "selfish"),
    ("victory", "defeat"),
    ("brave", "cowardly"),
    ("rough", "smooth"),
    ("early", "late"),
    ("empty", "full"),
    ("rare", "common"),
    ("shallow", "deep"),
    ("expand", "shrink"),
]
WORDS = [
    "planet",
    "garden",
    "bicycle",
    "window",
    "lantern",
    "pencil",
    "orange",
    "harbour",
    "silver",
    "compass",
    "meadow",
    "rocket",
    "blanket",
    "thunder",
]
SENTENCES = [
    "The quick fox jumped over the sleepy dog.",
    "Rain is expected later this evening.",
    "My brother plays the piano every Sunday morning.",
    "Fresh bread smells wonderful.",
    "We walked along the beach until the sun went down.",
    "Please remember to water the plants.",
]
# (unit, plural, target unit plural, factor): conversions with exact factors.
CONVERSIONS: list[tuple[str, str, str, int]] = [
    ("kilometer", "kilometers", "meters", 1000),
    ("meter", "meters", "centimeters", 100),
    ("kilogram", "kilograms", "grams", 1000),
    ("hour", "hours", "minutes", 60),
    ("minute", "minutes", "seconds", 60),
    ("liter", "liters", "milliliters", 1000),
    ("foot", "feet", "inches", 12),
    ("day", "days", "hours", 24),
    ("week", "weeks", "days", 7),
    ("yard", "yards", "feet", 3),
]
NAMES = ["Ana", "Ben", "Chloe", "Dev", "Ella", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Keiko", "Luca"]
OBJECTS = ["apples", "marbles", "stickers", "books", "pencils", "stamps", "shells", "coins"]


def _num(x: float) -> str:
    """Write a number without a trailing `.0`."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def _smallest_factor(n: int) -> int:
    return next(d for d in range(2, n + 1) if n % d == 0)


def templated_rows(rng: random.Random) -> list[tuple[str, str, str]]:
    """Rows whose answers are computed here, so they are correct by construction."""
    rows: list[tuple[str, str, str]] = []

    # Capitals, asked both ways.
    for i, (country, capital, continent) in enumerate(CAPITALS):
        if i % 3 == 2:
            rows.append(
                (
                    f"Which country has {capital} as its capital?",
                    "",
                    f"{capital} is the capital of {country}, a country in {continent}.",
                )
            )
        else:
            rows.append((f"What is the capital of {country}?", "", f"The capital of {country} is {capital}."))

    # Arithmetic: the output always contains the canonical equation `a op b = c` (tests re-check it).
    seen: set[tuple[int, str, int]] = set()

    def pick(op: str, lo: int, hi: int, lo2: int | None = None, hi2: int | None = None) -> tuple[int, int]:
        while True:
            a = rng.randint(lo, hi)
            b = rng.randint(lo if lo2 is None else lo2, hi if hi2 is None else hi2)
            if op == "-" and b > a:
                a, b = b, a
            if (a, op, b) not in seen:
                seen.add((a, op, b))
                return a, b

    add_forms = [
        "What is {a} + {b}?",
        "Add {a} and {b}.",
        "Calculate the sum of {a} and {b}.",
        "What do you get when you add {a} to {b}?",
    ]
    for i in range(14):
        a, b = pick("+", 12, 999)
        rows.append((add_forms[i % len(add_forms)].format(a=a, b=b), "", f"{a} + {b} = {a + b}."))
    sub_forms = ["What is {a} - {b}?", "Subtract {b} from {a}.", "What is the difference between {a} and {b}?"]
    for i in range(10):
        a, b = pick("-", 20, 999)
        rows.append((sub_forms[i % len(sub_forms)].format(a=a, b=b), "", f"{a} - {b} = {a - b}."))
    mul_forms = ["What is {a} × {b}?", "Multiply {a} by {b}.", "Calculate the product of {a} and {b}."]
    for i in range(10):
        a, b = pick("×", 3, 99, 2, 19)
        rows.append((mul_forms[i % len(mul_forms)].format(a=a, b=b), "", f"{a} × {b} = {a * b}."))
    for i in range(8):
        q, b = pick("÷", 3, 60, 2, 12)
        a = q * b
        form = "What is {a} ÷ {b}?" if i % 2 == 0 else "Divide {a} by {b}."
        rows.append((form.format(a=a, b=b), "", f"{a} ÷ {b} = {q}."))
    for _ in range(6):
        a, b = pick("+", 100, 5000)
        rows.append(("Add these two numbers.", f"{a} and {b}", f"{a} + {b} = {a + b}."))
    for n in rng.sample(range(11, 40), 5):
        rows.append((f"What is the square of {n}?", "", f"The square of {n} is {n * n}, because {n} × {n} = {n * n}."))

    # Word problems: the equation sits in the answer, so the arithmetic check covers these too.
    for i in range(8):
        name, obj = NAMES[i], OBJECTS[i]
        a, b = rng.randint(5, 40), rng.randint(2, 25)
        if i % 2 == 0:
            rows.append(
                (
                    f"{name} has {a} {obj} and gets {b} more. How many {obj} does {name} have now?",
                    "",
                    f"{name} has {a + b} {obj} now, because {a} + {b} = {a + b}.",
                )
            )
        else:
            a = a + b  # make sure the result stays positive
            rows.append(
                (
                    f"{name} had {a} {obj} and gave away {b}. How many {obj} are left?",
                    "",
                    f"{name} has {a - b} {obj} left, because {a} - {b} = {a - b}.",
                )
            )

    # Percentages with whole-number answers.
    pct_seen: set[tuple[int, int]] = set()
    while len(pct_seen) < 8:
        p, base = rng.choice([5, 10, 20, 25, 50, 75]), rng.choice(range(20, 401, 20))
        if (p, base) in pct_seen or p * base % 100:
            continue
        pct_seen.add((p, base))
        rows.append((f"What is {p}% of {base}?", "", f"{p}% of {base} is {p * base // 100}."))

    # Fractions to decimals (terminating decimals only).
    frac_seen: set[Fraction] = set()
    while len(frac_seen) < 8:
        den = rng.choice([2, 4, 5, 8, 10, 20, 25])
        num = rng.randint(1, den - 1)
        f = Fraction(num, den)
        if f in frac_seen or f.denominator != den:
            continue
        frac_seen.add(f)
        rows.append((f"Write the fraction {num}/{den} as a decimal.", "", f"{num}/{den} = {num / den:g}."))

    # Unit conversions (a couple of each kind), plus temperatures with exact answers.
    for unit, plural, target, factor in CONVERSIONS:
        for x in rng.sample(range(2, 13), 2):
            rows.append(
                (
                    f"How many {target} are in {x} {plural}?",
                    "",
                    f"{x} {plural} is {x * factor} {target}, because one {unit} is {factor} {target}.",
                )
            )
    for c in rng.sample(range(-20, 101, 5), 6):
        f = c * 9 / 5 + 32
        rows.append(
            (
                f"Convert {c} degrees Celsius to Fahrenheit.",
                "",
                f"{c} degrees Celsius is {_num(f)} degrees Fahrenheit, using F = C × 9/5 + 32.",
            )
        )

    # Lists of numbers given as input: sort, max, average.
    for _ in range(7):
        nums = rng.sample(range(1, 100), rng.randint(5, 7))
        rows.append(
            (
                "Sort these numbers from smallest to largest.",
                ", ".join(map(str, nums)),
                ", ".join(map(str, sorted(nums))) + ".",
            )
        )
    for _ in range(5):
        nums = rng.sample(range(1, 500), 6)
        rows.append(
            ("Find the largest number in this list.", ", ".join(map(str, nums)), f"The largest number is {max(nums)}.")
        )
    made = 0
    while made < 6:
        nums = rng.sample(range(1, 60), 4)
        if sum(nums) % len(nums):
            continue  # keep the averages whole numbers
        made += 1
        rows.append(
            (
                "Calculate the average of these numbers.",
                ", ".join(map(str, nums)),
                f"The numbers add up to {sum(nums)}, and {sum(nums)} ÷ {len(nums)} = {sum(nums) // len(nums)}, "
                "so the average is " + f"{sum(nums) // len(nums)}.",
            )
        )

    # Primes: half prime, half composite.
    primes = [n for n in range(20, 200) if _is_prime(n)]
    composites = [n for n in range(20, 200) if not _is_prime(n) and n % 2]  # odd composites are less obvious
    for n in rng.sample(primes, 5) + rng.sample(composites, 5):
        if _is_prime(n):
            rows.append((f"Is {n} a prime number?", "", f"Yes. {n} is prime: its only divisors are 1 and {n}."))
        else:
            d = _smallest_factor(n)
            rows.append((f"Is {n} a prime number?", "", f"No. {n} is not prime, because {d} × {n // d} = {n}."))

    # Word and string tasks.
    for word in WORDS[:5]:
        rows.append(("Spell this word backwards.", word, word[::-1]))
    for word in WORDS[5:10]:
        rows.append((f"How many letters are in the word '{word}'?", "", f"The word '{word}' has {len(word)} letters."))
    for word in WORDS[10:]:
        rows.append(("Write this word in capital letters.", word, word.upper()))
    for sentence in SENTENCES:
        n_words = len(sentence.split())
        rows.append(("Count the words in this sentence.", sentence, f"The sentence has {n_words} words."))
    for singular, plural in PLURALS:
        rows.append((f"What is the plural of '{singular}'?", "", f"The plural of '{singular}' is '{plural}'."))
    for word, opposite in ANTONYMS:
        rows.append(("Give the opposite of this word.", word, f"The opposite of '{word}' is '{opposite}'."))
    for animal, cls in ANIMAL_CLASSES:
        article = "an" if animal[0] in "aeiou" else "a"
        rows.append(
            (
                "Classify this animal as a mammal, bird, reptile, fish or amphibian.",
                animal,
                f"{article.capitalize()} {animal} is {'an' if cls[0] in 'aeiou' else 'a'} {cls}: "
                f"{CLASS_REASONS[cls]}.",
            )
        )
    return rows


def build_rows() -> list[dict[str, str]]:
    """All rows, deduplicated check included, in the committed (shuffled) order."""
    rng = random.Random(SEED)
    triples = HAND_WRITTEN + templated_rows(rng)
    keys = [(ins, inp) for ins, inp, _ in triples]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"duplicate (instruction, input) pairs: {dupes}")
    rows = [{"instruction": ins, "input": inp, "output": out} for ins, inp, out in triples]
    # Shuffle once so any contiguous slice mixes task types (the ablation trains on a slice).
    rng.shuffle(rows)
    return rows


def render(rows: list[dict[str, str]]) -> str:
    """JSON lines text, one object per line, UTF-8 kept readable."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the committed file is up to date")
    args = parser.parse_args(argv)
    text = render(build_rows())
    if args.check:
        current = OUT_PATH.read_text(encoding="utf-8") if OUT_PATH.exists() else ""
        if current != text:
            print(f"{OUT_PATH} is stale: run python scripts/make_bundled_dataset.py", file=sys.stderr)
            return 1
        print(f"{OUT_PATH} is up to date")
        return 0
    OUT_PATH.parent.mkdir(parents=True, exist_ok=True)
    OUT_PATH.write_text(text, encoding="utf-8")
    rows = text.count("\n")
    print(f"wrote {rows} rows to {OUT_PATH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
