"""The toy text: the word lists and sentence templates of the built-in toy tasks, and the corpus tiny-bert's
WordPiece tokenizer is trained on (so the toy sentences never tokenize to [UNK]).

Plain Python and numpy, shared by flatray.data.toy (the toy data sets) and flatray.models (tiny-bert) so that neither
imports the other. Changing anything here changes tiny-bert's tokenizer: bump flatray.models.TINY_BERT_VERSION."""

import numpy as np

POSITIVE = ("good great wonderful excellent lovely brilliant pleasant delightful superb charming fantastic splendid "
            "marvelous terrific enjoyable beautiful fine cheerful gentle friendly perfect amazing happy bright").split()
NEGATIVE = ("bad awful terrible horrible dreadful poor boring dull nasty ugly gloomy painful annoying miserable "
            "clumsy weak rude sloppy bland tedious grim lousy sad broken").split()
SUBJECTS = ("the movie", "the film", "this book", "the meal", "our trip", "the show", "the hotel", "that song",
            "the game", "the story", "my day", "the class", "the concert", "the park", "the service", "the room",
            "the plot", "the city", "the weather", "the party")
ADVERBS = ("very", "quite", "rather", "really", "truly", "somewhat", "so", "pretty", "fairly", "")
FILLERS = ("today", "last night", "this week", "in the end", "to be honest", "as expected", "for sure", "again",
           "overall", "at first", "")
TEMPLATES = ("{subj} was {adv} {adj} {fill}", "{subj} is {adj} {fill}", "i think {subj} was {adv} {adj}",
             "honestly , {subj} seemed {adv} {adj} {fill}", "{fill} , {subj} felt {adj}",
             "it was a {adj} time with {subj} {fill}", "we all found {subj} {adv} {adj} {fill}",
             "{subj} , {fill} , looked {adj}")


def toy_sentences(rng, labels, topic: bool = False) -> list[str]:
    """One sentence per label, drawn with `rng` (a numpy Generator). Sentiment: the adjective's list decides the
    label. Topic: whether the subject is in the first half of SUBJECTS does, and the adjective is random."""
    out = []
    half = len(SUBJECTS) // 2
    for label in labels:
        template = TEMPLATES[rng.integers(len(TEMPLATES))]  # draws in the original order: toy's data is unchanged
        if topic:
            adjs = POSITIVE if rng.integers(2) else NEGATIVE
            subj = SUBJECTS[rng.integers(half) + (0 if label == 1 else half)]
        else:
            adjs = POSITIVE if label == 1 else NEGATIVE
            subj = SUBJECTS[rng.integers(len(SUBJECTS))]
        text = template.format(
            subj=subj, adv=ADVERBS[rng.integers(len(ADVERBS))],
            adj=adjs[rng.integers(len(adjs))], fill=FILLERS[rng.integers(len(FILLERS))])
        text = " ".join(text.split()).replace(", ,", ",").strip(" ,")  # close gaps of empty adverbs/fillers
        out.append(text[0].upper() + text[1:] + " .")
    return out


_GENERIC = """\
What is the name of the largest city in the country?
The company said on Tuesday that its profits rose by 12 percent in 2019.
How many people live in New York, London and Paris?
She did not believe that the story was true, but he agreed with her.
A man is playing a guitar while a woman is singing on the stage.
The government announced new rules for schools, hospitals and the police.
Who wrote the book about the war between the two kingdoms?
When did the university open its first library for students?
He said he would never go back there after what happened.
Scientists found that water on the planet may have existed for millions of years.
The children were running in the park near the river in the morning.
Is it possible to learn a new language in three months?
Why do some birds fly south for the winter each year?
The president of the United States met the prime minister in Washington.
Two dogs are playing with a ball on the green grass.
The price of oil fell sharply after the report was published.
Which team won the championship game in the final minutes?
The museum has a large collection of paintings from the 18th century.
Most of the members voted against the proposal at the meeting.
I would like to know where the nearest train station is.
The new law will take effect on January 1 and affect thousands of workers.
According to the article, the bridge was built in 1889 by French engineers.
There is no evidence that the drug causes any serious side effects.
The film tells the story of a young woman who moves to a big city.
Although it rained all day, the festival was still full of people.
Can you explain the difference between these two questions?
The population of the region grew quickly during the last decade.
Police arrested three men in connection with the robbery on Monday.
The doctor told him to eat more vegetables and drink less coffee.
This sentence is not grammatical because the verb does not agree with the subject.
Both sentences mean the same thing, so they are paraphrases of each other.
Does the premise imply the hypothesis, contradict it, or is it neutral?
The quick brown fox jumps over the lazy dog; 0 1 2 3 4 5 6 7 8 9 % $ & ' " ( ) - : / ! ?
"""


def toy_corpus() -> list[str]:
    """Text to train a tiny WordPiece tokenizer on: the whole toy vocabulary plus generic English."""
    words = POSITIVE + NEGATIVE + list(SUBJECTS) + list(ADVERBS) + list(FILLERS) + list(TEMPLATES)
    lines = [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    lines += _GENERIC.splitlines()
    lines += toy_sentences(np.random.default_rng(12345), np.arange(300) % 2)
    return [line for line in lines if line.strip()]
